"""FSAT step 1: the hidden-state cross, pooled by offset (spec/fsat.md, step 1).

For every offset tau = j - i in {-(L-1), ..., L-1} the cross is the mean, over the valid pairs on
that diagonal, of the elementwise products of the two inputs:

    c_tau = (1 / n_tau) * sum_{valid i} a_i * b_{i+tau}        (a vector of Dc features)

A pair (i, i + tau) is valid when both positions lie in [0, L) and neither is padding; n_tau counts
the valid pairs. All L**2 pairs are pooled without forming them: the numerator is a linear
convolution of the reversed ``a`` with ``b`` along the sequence axis, computed with zero-padded real
FFTs of length N = next_fast_len(2L - 1) (no wrap-around can reach the 2L - 1 outputs kept).

Each public function ``f`` is ``check_f`` (validate the arguments), the promotion to float64, and
``f_core`` (compute on validated arrays of any floating dtype, NumPy or CuPy); see :mod:`refattn.fsat`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "check_pair_counts",
    "check_cross",
    "check_cross_vjp",
    "pair_counts_core",
    "cross_core",
    "cross_vjp_core",
    "next_fast_len",
]

AXES = "(B, H, L, Dc)"


def next_fast_len(target: int) -> int:
    """The smallest 2**a * 3**b * 5**c >= target: ``scipy.fft.next_fast_len(target, real=True)``.

    Pure Python, so that ``torch.compile`` traces it as a constant (SciPy's is a C extension) and the
    CuPy and torch backends pick the FFT lengths the reference picks; a test checks it against SciPy.
    """
    if target <= 6:
        return max(int(target), 1)
    best = 1 << (target - 1).bit_length()  # a power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            quotient = -(-target // p35)  # the smallest power of two with p35 * 2**a >= target
            best = min(best, p35 * (1 << (quotient - 1).bit_length()))
            p35 *= 3
        p5 *= 5
    return best


def _convolve(x: Any, y: Any, axis: int, size: int) -> Any:
    """Full linear convolution of ``x`` and ``y`` along ``axis`` (other axes broadcast), truncated to
    its first ``size`` entries, through zero-padded real FFTs of length ``next_fast_len(len(x) + len(y) - 1)``.
    """
    fft = checks.fft_namespace(checks.array_namespace(x, y))
    n = next_fast_len(x.shape[axis] + y.shape[axis] - 1)
    spectrum = fft.rfft(x, n=n, axis=axis)
    spectrum *= fft.rfft(y, n=n, axis=axis)  # the second spectrum is freed right after
    full = fft.irfft(spectrum, n=n, axis=axis)
    del spectrum
    index = [slice(None)] * full.ndim
    index[axis] = slice(0, size)
    return full[tuple(index)]


def check_pair_counts(length: Any, key_padding_mask: Any = None) -> tuple[int, Any]:
    """Validate the arguments of :func:`pair_counts`; returns them in that order."""
    length = checks.integer_in_range(length, "length", low=1)
    mask = checks.padding_mask(checks.as_array(key_padding_mask, "key_padding_mask"), None, length)
    return length, mask


def pair_counts_core(length: int, key_padding_mask: Any = None, *, xp: ModuleType | None = None) -> Any:
    """:func:`pair_counts` of validated arguments, in the namespace ``xp`` (default: the mask's,
    NumPy without a mask). The counts are computed in float64 whatever the caller's dtype (exact)."""
    xp = xp or checks.array_namespace(key_padding_mask)
    if key_padding_mask is None:
        tau = xp.arange(-(length - 1), length)
        return (length - xp.abs(tau))[None, :].astype(np.int64)
    valid = (~key_padding_mask).astype(np.float64)
    counts = _convolve(valid[:, ::-1], valid, axis=1, size=2 * length - 1)
    return xp.rint(counts).astype(np.int64)


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
    length, key_padding_mask = check_pair_counts(length, key_padding_mask)
    return pair_counts_core(length, key_padding_mask)


def _inverse_counts(length: int, mask: Any, like: Any) -> Any:
    """1 / n_tau as a (B or 1, 1, 2L - 1, 1) array of ``like``'s namespace and dtype, 0 where n_tau = 0."""
    xp = checks.array_namespace(like)
    counts = pair_counts_core(length, mask, xp=xp).astype(np.float64)
    inverse = xp.where(counts > 0, 1.0 / xp.maximum(counts, 1.0), 0.0)
    return inverse[:, None, :, None].astype(like.dtype, copy=False)


def _zero_padded(x: Any, mask: Any) -> Any:
    """x (B, H, L, F) with the rows of padded positions replaced by zeros (a new array when masked)."""
    if mask is None:
        return x
    return checks.array_namespace(x).where(mask[:, None, :, None], 0.0, x)


def check_cross(a: Any, b: Any, key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """Validate the arguments of :func:`cross`; returns them in that order (arrays unchanged)."""
    a, b, key_padding_mask = checks.arrays(a=a, b=b, key_padding_mask=key_padding_mask)
    a = checks.sequence(a, "a", AXES)
    b = checks.sequence(b, "b", AXES, a.shape[:3], feature=a.shape[3])
    mask = checks.padding_mask(key_padding_mask, a.shape[0], a.shape[2])
    return a, b, mask


def cross_core(a: Any, b: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`cross` of validated arrays of one floating dtype, computed and returned in that dtype."""
    length = a.shape[2]
    a, b = _zero_padded(a, key_padding_mask), _zero_padded(b, key_padding_mask)
    numerator = _convolve(a[:, :, ::-1], b, axis=2, size=2 * length - 1)
    return numerator * _inverse_counts(length, key_padding_mask, numerator)


OVERFLOWS = {
    "cross": (checks.Overflow("the cross", ("a", "b")),),
    "cross_vjp": (checks.Overflow("the gradient of the cross", ("b", "dc")),
                  checks.Overflow("the gradient of the cross", ("a", "dc"))),
}


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
    a, b, key_padding_mask = check_cross(a, b, key_padding_mask)
    a, b = as_float64(a, b)
    c = cross_core(a, b, key_padding_mask=key_padding_mask)
    checks.check_overflows(c, OVERFLOWS["cross"], a=a, b=b)
    return c


def check_cross_vjp(a: Any, b: Any, dc: Any, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """Validate the arguments of :func:`cross_vjp`; returns them in that order."""
    a, b, key_padding_mask = check_cross(a, b, key_padding_mask)
    dc = checks.as_array(dc, "dc")
    batch, heads, length, features = a.shape
    dc = checks.sequence(dc, "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
    return a, b, dc, key_padding_mask


def cross_vjp_core(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """:func:`cross_vjp` of validated arrays of one floating dtype, computed and returned in that dtype."""
    xp = checks.array_namespace(a, b, dc)
    length = a.shape[2]
    a, b = _zero_padded(a, key_padding_mask), _zero_padded(b, key_padding_mask)
    g = dc * _inverse_counts(length, key_padding_mask, dc)
    da = _convolve(b, g[:, :, ::-1], axis=2, size=2 * length - 1)[:, :, length - 1 :]
    db = _convolve(a, g, axis=2, size=2 * length - 1)[:, :, length - 1 :]
    da, db = _zero_padded(da, key_padding_mask), _zero_padded(db, key_padding_mask)
    return xp.ascontiguousarray(da), xp.ascontiguousarray(db)


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
    a, b, dc, key_padding_mask = check_cross_vjp(a, b, dc, key_padding_mask)
    a, b, dc = as_float64(a, b, dc)
    da, db = cross_vjp_core(a, b, dc, key_padding_mask=key_padding_mask)
    checks.check_overflows((da, db), OVERFLOWS["cross_vjp"], a=a, b=b, dc=dc)
    return da, db
