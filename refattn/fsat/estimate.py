"""FSAT step 2a: the sparse attention matrix estimate, one score per offset (spec/fsat.md, step 2).

    s_tau = <w_h, c_tau> / sqrt(Dc),   s_tau = -inf where n_tau = 0

With w = 1 and the cross inputs left at q and k, s_tau is the mean attention logit q_i . k_{i+tau} /
sqrt(D) on diagonal tau: the least-squares Toeplitz approximation of the logit matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .cross import pair_counts_core

__all__ = ["estimate", "estimate_vjp", "check_estimate", "check_estimate_vjp", "estimate_core", "estimate_vjp_core"]

AXES = "(B, H, 2L - 1, Dc)"


def _has_pairs(c: Any, mask: Any) -> Any:
    """(B or 1, 1, 2L - 1) bool "n_tau > 0" for the cross c (B, H, 2L - 1, Dc)."""
    length = (c.shape[2] + 1) // 2
    return pair_counts_core(length, mask, xp=checks.array_namespace(c))[:, None, :] > 0


def check_estimate(c: Any, w: Any, key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """Validate the arguments of :func:`estimate`; returns them in that order."""
    c, w, key_padding_mask = checks.arrays(c=c, w=w, key_padding_mask=key_padding_mask)
    c = checks.sequence(c, "c", AXES)
    batch, heads, count, features = c.shape
    length = checks.length_from_offsets(count, "c")
    w = checks.float_array(w, "w", rank=2, axes="(H, Dc)")
    checks.expect_shape(w, "w", (heads, features), "(H, Dc)")
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return c, w, mask


def estimate_core(c: Any, w: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`estimate` of validated arrays of one floating dtype, computed and returned in that dtype."""
    xp = checks.array_namespace(c, w)
    scores = xp.matmul(c, w[None, :, :, None])[..., 0] / math.sqrt(c.shape[3])
    return xp.where(_has_pairs(c, key_padding_mask), scores, -np.inf)


OVERFLOWS = {
    "estimate": (checks.Overflow("the estimate", ("c", "w"), allow_neg_inf=True),),
    "estimate_vjp": (checks.Overflow("the gradient of the estimate", ("ds", "w")),
                     checks.Overflow("the gradient of the estimate", ("ds", "c"))),
}


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
    c, w, key_padding_mask = check_estimate(c, w, key_padding_mask)
    c, w = as_float64(c, w)
    s = estimate_core(c, w, key_padding_mask=key_padding_mask)
    checks.check_overflows(s, OVERFLOWS["estimate"], c=c, w=w)
    return s


def check_estimate_vjp(c: Any, w: Any, ds: Any, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """Validate the arguments of :func:`estimate_vjp`; returns them in that order."""
    c, w, key_padding_mask = check_estimate(c, w, key_padding_mask)
    ds = checks.float_array(checks.as_array(ds, "ds"), "ds", rank=3, axes="(B, H, 2L - 1)")
    checks.expect_shape(ds, "ds", c.shape[:3], "(B, H, 2L - 1)")
    return c, w, ds, key_padding_mask


def estimate_vjp_core(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """:func:`estimate_vjp` of validated arrays of one floating dtype, computed and returned in that dtype."""
    xp = checks.array_namespace(c, w, ds)
    ds = xp.where(_has_pairs(c, key_padding_mask), ds, 0.0) / math.sqrt(c.shape[3])
    dc = ds[..., None] * w[None, :, None, :]
    dw = xp.einsum("bht,bhtd->hd", ds, c)
    return dc, dw


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
    c, w, ds, key_padding_mask = check_estimate_vjp(c, w, ds, key_padding_mask)
    c, w, ds = as_float64(c, w, ds)
    dc, dw = estimate_vjp_core(c, w, ds, key_padding_mask=key_padding_mask)
    checks.check_overflows((dc, dw), OVERFLOWS["estimate_vjp"], c=c, w=w, ds=ds)
    return dc, dw
