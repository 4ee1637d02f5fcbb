"""FSAT step 2a: the sparse attention matrix estimate, one score per offset (spec/fsat.md, step 2).

    s_tau = <w_h, c_tau> / sqrt(Dc),   s_tau = -inf where n_tau = 0

With w = 1 and the cross inputs left at q and k, s_tau is the mean attention logit q_i . k_{i+tau} /
sqrt(D) on diagonal tau: the least-squares Toeplitz approximation of the logit matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array, padding_mask, sequence

from ._checks import length_from_offsets
from .cross import pair_counts

__all__ = ["estimate", "estimate_vjp"]


def _inputs(c: Any, w: Any, key_padding_mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate (c, w, mask); return c, w and a (B or 1, 1, 2L - 1) bool array "n_tau > 0"."""
    c = sequence(c, "c", "(B, H, 2L - 1, Dc)")
    batch, heads, count, features = c.shape
    length = length_from_offsets(count, "c")
    w = float_array(w, "w", rank=2, axes="(H, Dc)")
    expect_shape(w, "w", (heads, features), "(H, Dc)")
    mask = padding_mask(key_padding_mask, batch, length)
    has_pairs = pair_counts(length, mask)[:, None, :] > 0
    return c, w, has_pairs


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> np.ndarray:
    """Score every offset: s[b, h, t] = <w[h], c[b, h, t]> / sqrt(Dc), and -inf where n_tau = 0.

    Args:
        c: the cross, (B, H, 2L - 1, Dc) (output of :func:`cross`); index t holds tau = t - (L - 1).
        w: (H, Dc) per-head weights (the modules that own w initialise it to ones).
        key_padding_mask: optional bool (B, L), True = padding; only used to find the offsets with
            no valid pair (n_tau = 0), whose score is -inf. Without a mask every offset has a pair.

    Returns:
        s: (B, H, 2L - 1) float64, finite except -inf at offsets with n_tau = 0 (with padding: the
        far offsets that no two unpadded positions span; a fully padded batch row is all -inf).

    Cost O(L * Dc) per (batch, head).
    """
    c, w, has_pairs = _inputs(c, w, key_padding_mask)
    scores = np.matmul(c, w[None, :, :, None])[..., 0] / np.sqrt(c.shape[3])
    return np.where(has_pairs, scores, -np.inf)


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`estimate`.

    Over the offsets with n_tau > 0 only (``ds`` elsewhere is ignored: s is a constant -inf there):

        dc[b, h, t] = ds[b, h, t] * w[h] / sqrt(Dc)
        dw[h]       = sum_{b, t} ds[b, h, t] * c[b, h, t] / sqrt(Dc)

    Args:
        c, w, key_padding_mask: the forward inputs.
        ds: cotangent of s, (B, H, 2L - 1), finite.

    Returns:
        (dc (B, H, 2L - 1, Dc), dw (H, Dc)), float64.
    """
    c, w, has_pairs = _inputs(c, w, key_padding_mask)
    ds = float_array(ds, "ds", rank=3, axes="(B, H, 2L - 1)")
    expect_shape(ds, "ds", c.shape[:3], "(B, H, 2L - 1)")
    ds = np.where(has_pairs, ds, 0.0) / np.sqrt(c.shape[3])
    dc = ds[..., None] * w[None, :, None, :]
    dw = np.einsum("bht,bhtd->hd", ds, c)
    return dc, dw
