"""FSAT step 1: the hidden-state cross, pooled by offset (spec/fsat.md, step 1).

For every offset tau = j - i in {-(L-1), ..., L-1} the cross is the mean, over the valid pairs on
that diagonal, of the elementwise products of the two inputs:

    c_tau = (1 / n_tau) * sum_{valid i} a_i * b_{i+tau}        (a vector of Dc features)

A pair (i, i + tau) is valid when both positions lie in [0, L) and neither is padding; n_tau counts
the valid pairs. All L**2 pairs are pooled without forming them: the numerator is a linear
convolution of the reversed ``a`` with ``b`` along the sequence axis, computed with zero-padded real
FFTs of length N = next_fast_len(2L - 1) (no wrap-around can reach the 2L - 1 outputs kept).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft

from refattn._validation import integer_in_range, padding_mask, sequence


__all__ = ["pair_counts", "cross", "cross_vjp"]

_AXES = "(B, H, L, Dc)"


def _fft_length(length: int) -> int:
    """N >= 2L - 1, a fast size for real FFTs: the linear convolutions below never wrap around."""
    return scipy.fft.next_fast_len(2 * length - 1, real=True)


def _convolve(x: np.ndarray, y: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Full linear convolution of ``x`` and ``y`` along ``axis`` (other axes broadcast), truncated to
    its first ``size`` entries, through zero-padded real FFTs of length ``next_fast_len(len(x) + len(y) - 1)``.
    """
    n = scipy.fft.next_fast_len(x.shape[axis] + y.shape[axis] - 1, real=True)
    spectrum = scipy.fft.rfft(x, n=n, axis=axis)
    spectrum *= scipy.fft.rfft(y, n=n, axis=axis)  # the second spectrum is freed right after
    full = scipy.fft.irfft(spectrum, n=n, axis=axis)
    del spectrum
    index = [slice(None)] * full.ndim
    index[axis] = slice(0, size)
    return full[tuple(index)]


def _mask_array(key_padding_mask: Any, length: int) -> np.ndarray:
    """Validate a (B, L) bool mask whose batch size is not known from another argument."""
    mask = np.asarray(key_padding_mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"key_padding_mask: expected a bool array (True = padding), got dtype {mask.dtype}")
    if mask.ndim != 2 or mask.shape[1] != length or mask.shape[0] < 1:
        raise ValueError(f"key_padding_mask: expected shape (B, L) with L = {length}, got {mask.shape}")
    return mask


def pair_counts(length: int, key_padding_mask: Any = None) -> np.ndarray:
    """Number of valid pairs n_tau on every diagonal tau = j - i.

    ``n[., t]`` holds tau = t - (L - 1), t in [0, 2L - 1). A pair (i, i + tau) is valid when both
    positions lie in [0, L) and, with ``key_padding_mask`` (bool (B, L), True = padding), neither
    position is padding.

    Without a mask n_tau = L - |tau| and the result has shape (1, 2L - 1); with one it is the
    correlation of the validity indicator with itself, shape (B, 2L - 1), computed with a real FFT
    and rounded to the nearest integer (exact: the values are integers at most L, the FFT error is
    many orders of magnitude below 1/2). A fully padded batch row has n_tau = 0 everywhere.

    Returns int64.
    """
    length = integer_in_range(length, "length", low=1)
    tau = np.arange(-(length - 1), length)
    if key_padding_mask is None:
        return (length - np.abs(tau))[None, :].astype(np.int64)
    mask = _mask_array(key_padding_mask, length)
    valid = (~mask).astype(np.float64)
    counts = _convolve(valid[:, ::-1], valid, axis=1, size=2 * length - 1)
    return np.rint(counts).astype(np.int64)


def _inputs(a: Any, b: Any, key_padding_mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate the cross inputs and zero their padded rows (new arrays; the caller's are untouched)."""
    a = sequence(a, "a", _AXES)
    b = sequence(b, "b", _AXES, a.shape[:3], feature=a.shape[3])
    mask = padding_mask(key_padding_mask, a.shape[0], a.shape[2])
    if mask is not None:
        padded = mask[:, None, :, None]
        a = np.where(padded, 0.0, a)
        b = np.where(padded, 0.0, b)
    return a, b, mask


def _inverse_counts(length: int, mask: np.ndarray | None) -> np.ndarray:
    """1 / n_tau as a (B or 1, 1, 2L - 1, 1) array, 0 where n_tau = 0."""
    counts = pair_counts(length, mask).astype(np.float64)
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return inverse[:, None, :, None]


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> np.ndarray:
    """Hidden-state cross: the per-offset mean of elementwise products, for every offset at once.

        c[b, h, t] = (1 / n_tau) * sum_{i : (i, i + tau) valid} a[b, h, i] * b[b, h, i + tau],
        tau = t - (L - 1)

    Args:
        a: (B, H, L, Dc) real floats (FSAT uses q here by default).
        b: (B, H, L, Dc) real floats (FSAT uses k here by default).
        key_padding_mask: optional bool (B, L), True = padding. Padded rows of ``a`` and ``b`` are
            treated as zero and padded positions do not count in n_tau.

    Returns:
        c: (B, H, 2L - 1, Dc) float64; index t holds offset tau = t - (L - 1), so t = L - 1 is the
        main diagonal. Offsets with n_tau = 0 (possible only with padding, e.g. a fully padded batch
        row) hold exactly 0.

    Edge cases: L = 1 gives the single offset 0 with c_0 = a_0 * b_0. Any L works (prime or not):
    the FFT length is next_fast_len(2L - 1), never L itself. Cost O(N log N * Dc) time and
    O(N * Dc) memory per (batch, head), N < 2 * (2L - 1); no L x L array is formed.
    """
    a, b, mask = _inputs(a, b, key_padding_mask)
    length = a.shape[2]
    numerator = _convolve(a[:, :, ::-1], b, axis=2, size=2 * length - 1)
    return numerator * _inverse_counts(length, mask)


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`cross`.

    With g_tau = dc_tau / n_tau (0 where n_tau = 0), and only for unpadded i and j:

        da_i = sum_tau g_tau * b_{i+tau}  = sum_j g_{j-i} * b_j
        db_j = sum_tau g_tau * a_{j-tau}  = sum_i g_{j-i} * a_i

    Both are linear convolutions of length 3L - 2 of which the middle L entries are kept
    (da = (b conv reverse(g))[L-1 : 2L-1], db = (a conv g)[L-1 : 2L-1]); an FFT length of
    next_fast_len(3L - 2) keeps them free of wrap-around. Padded rows of da and db are 0 (the
    forward replaces those rows by zeros). ``dc`` at offsets with n_tau = 0 is ignored.

    Args:
        a, b: the forward inputs, (B, H, L, Dc).
        dc: cotangent of c, (B, H, 2L - 1, Dc).
        key_padding_mask: as in the forward.

    Returns:
        (da, db), each (B, H, L, Dc) float64.
    """
    a, b, mask = _inputs(a, b, key_padding_mask)
    batch, heads, length, features = a.shape
    dc = sequence(dc, "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
    g = dc * _inverse_counts(length, mask)
    da = _convolve(b, g[:, :, ::-1], axis=2, size=2 * length - 1)[:, :, length - 1 :]
    db = _convolve(a, g, axis=2, size=2 * length - 1)[:, :, length - 1 :]
    if mask is not None:
        padded = mask[:, None, :, None]
        da = np.where(padded, 0.0, da)
        db = np.where(padded, 0.0, db)
    return np.ascontiguousarray(da), np.ascontiguousarray(db)
