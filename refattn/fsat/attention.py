"""FSAT end to end: cross -> estimate -> select -> sparse attention (spec/fsat.md), and its gradient
with the truncation of step 4.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .cross import cross_core, cross_vjp_core
from .estimate import estimate_core, estimate_vjp_core
from .select import select_core
from .sparse_attention import OVERFLOWS as SPARSE_OVERFLOWS
from .sparse_attention import sparse_attention_core, sparse_attention_vjp_core

__all__ = [
    "FSATGrads",
    "Plan",
    "attention",
    "attention_vjp",
    "check_attention",
    "check_attention_vjp",
    "attention_core",
    "attention_vjp_core",
    "plan_core",
]


class FSATGrads(NamedTuple):
    """Gradients returned by :func:`attention_vjp` (and every backend's); ``cross_q``/``cross_k`` are
    None unless given. Arrays of the backend's kind (float64 NumPy arrays for the reference)."""

    q: Any
    k: Any
    v: Any
    w: Any
    cross_q: Any | None
    cross_k: Any | None


def check_attention(
    q: Any, k: Any, v: Any, w: Any, top_k: Any, causal: Any = False, key_padding_mask: Any = None,
    noise: Any = None, cross_q: Any = None, cross_k: Any = None,
) -> tuple[Any, Any, Any, Any, int, bool, Any, Any, Any, Any]:
    """Validate the arguments of :func:`attention`; returns them in that order."""
    q, k, v, w, key_padding_mask, noise, cross_q, cross_k = checks.arrays(
        q=q, k=k, v=v, w=w, key_padding_mask=key_padding_mask, noise=noise, cross_q=cross_q, cross_k=cross_k
    )
    q = checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    if cross_q is not None:
        cross_q = checks.sequence(cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        cross_k = checks.sequence(cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=cross_q.shape[3])
    features = dim if cross_q is None else cross_q.shape[3]
    w = checks.float_array(w, "w", rank=2, axes="(H, Dc)")
    checks.expect_shape(w, "w", (heads, features), "(H, Dc)")
    top_k = checks.integer_in_range(top_k, "top_k", low=1)
    causal = checks.flag(causal, "causal")
    mask = checks.padding_mask(key_padding_mask, batch, length)
    if noise is not None:
        noise = checks.float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        checks.expect_shape(noise, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    return q, k, v, w, top_k, causal, mask, noise, cross_q, cross_k


class Plan(NamedTuple):
    """Steps 1-2 of FSAT (:func:`plan_core`)."""

    c: Any  # (B, H, 2L - 1, Dc) the cross
    s: Any  # (B, H, 2L - 1) the estimate, -inf where n_tau = 0
    offsets: Any  # (B, H, K_eff) int64, the selected offsets
    bias: Any  # (B, H, K_eff) = s at the offsets


def plan_core(
    q: Any, k: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None, noise: Any = None,
    cross_q: Any = None, cross_k: Any = None,
) -> Plan:
    """Steps 1-2 on validated arrays of one floating dtype: c = cross(a, b) with (a, b) = (cross_q,
    cross_k) or (q, k), s = estimate(c, w), the offsets select(s, K, noise) and their bias s[offsets].

    Raises ``ValueError`` (:func:`refattn.checks.check_overflow`) when the cross or the estimate
    overflows the dtype, naming the arguments that did.
    """
    xp = checks.array_namespace(q, k, w)
    a, b = (q, k) if cross_q is None else (cross_q, cross_k)
    names = ("q", "k") if cross_q is None else ("cross_q", "cross_k")
    c = cross_core(a, b, key_padding_mask=key_padding_mask)
    checks.check_overflow(c, "the cross", **dict(zip(names, (a, b), strict=True)))
    s = estimate_core(c, w, key_padding_mask=key_padding_mask)
    checks.check_overflow(s, "the estimate", allow_neg_inf=True, **dict(zip(names, (a, b), strict=True)), w=w)
    offsets = select_core(s, top_k, causal=causal, noise=noise)
    bias = xp.take_along_axis(s, offsets + (q.shape[2] - 1), axis=2)
    return Plan(c, s, offsets, bias)


def attention_core(
    q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None,
    noise: Any = None, cross_q: Any = None, cross_k: Any = None,
) -> Any:
    """:func:`attention` of validated arguments of one floating dtype, computed and returned in that
    dtype; raises ``ValueError`` when a step overflows it (:func:`plan_core`, and the attention logits)."""
    plan = plan_core(q, k, w, top_k, causal=causal, key_padding_mask=key_padding_mask, noise=noise,
                     cross_q=cross_q, cross_k=cross_k)
    offsets, bias = plan.offsets, plan.bias
    del plan  # frees the (B, H, 2L - 1, Dc) cross before the attention runs
    out, lse = sparse_attention_core(q, k, v, offsets, bias, causal=causal, key_padding_mask=key_padding_mask)
    checks.check_overflows((out, lse), SPARSE_OVERFLOWS["sparse_attention"], q=q, k=k)
    return out


def attention(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    top_k: int,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
    noise: Any = None,
    cross_q: Any = None,
    cross_k: Any = None,
) -> np.ndarray:
    """FSAT attention.

        c       = cross(a, b)                      a, b = cross_q, cross_k (default q, k)
        s       = estimate(c, w)                   s_tau = <w_h, c_tau> / sqrt(Dc), -inf where n_tau = 0
        offsets = select(s, K, noise)              tau = 0 and the K - 1 best candidates of s + g
        out     = sparse_attention(q, k, v, offsets, s[offsets])

    i.e. out_i = sum_m softmax_m(q_i . k_{i+tau_m} / sqrt(D) + s_{tau_m}) v_{i+tau_m}: the content
    attention restricted to the predicted diagonals and reweighted by the predicted matrix.

    Args:
        q, k: (B, H, L, D); v: (B, H, L, Dv).
        w: (H, Dc) estimator weights (Dc = D when the cross inputs default to q and k).
        top_k: K >= 1; K_eff = min(K, 2L - 1), causal min(K, L).
        causal: keys j <= i only; the candidate offsets are then tau < 0.
        key_padding_mask: optional bool (B, L), True = padding; padded rows output 0.
        noise: optional finite (B, H, 2L - 1), added to s for the selection only.
        cross_q, cross_k: optional (B, H, L, Dc) cross inputs, both or neither.

    Returns:
        out (B, H, L, Dv) float64. Every unpadded row attends at least to itself (tau = 0).

    Cost O(N log N * Dc + L * K * (D + Dv)) time, O(N * Dc + L * (K + D + Dv)) memory per
    (batch, head), N = next_fast_len(2L - 1); no L x L array.
    """
    q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k = check_attention(
        q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k
    )
    q, k, v, w, noise, cross_q, cross_k = as_float64(q, k, v, w, noise, cross_q, cross_k)
    return attention_core(q, k, v, w, top_k, causal=causal, key_padding_mask=key_padding_mask, noise=noise,
                          cross_q=cross_q, cross_k=cross_k)


def check_attention_vjp(
    q: Any, k: Any, v: Any, w: Any, top_k: Any, dout: Any, causal: Any = False, key_padding_mask: Any = None,
    noise: Any = None, cross_q: Any = None, cross_k: Any = None,
) -> tuple[Any, Any, Any, Any, int, Any, bool, Any, Any, Any, Any]:
    """Validate the arguments of :func:`attention_vjp`; returns them in that order."""
    q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k = check_attention(
        q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k
    )
    dout = checks.sequence(checks.as_array(dout, "dout"), "dout", "(B, H, L, Dv)", q.shape[:3], feature=v.shape[3])
    return q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k


def attention_vjp_core(
    q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False, key_padding_mask: Any = None,
    noise: Any = None, cross_q: Any = None, cross_k: Any = None,
) -> FSATGrads:
    """:func:`attention_vjp` of validated arguments of one floating dtype, computed and returned in
    that dtype; raises ``ValueError`` when the forward steps (:func:`plan_core`) overflow it (:func:`attention_vjp`
    checks the gradients, by ``OVERFLOWS``)."""
    xp = checks.array_namespace(q, k, v)
    plan = plan_core(q, k, w, top_k, causal=causal, key_padding_mask=key_padding_mask, noise=noise,
                     cross_q=cross_q, cross_k=cross_k)
    dq, dk, dv, dbias = sparse_attention_vjp_core(
        q, k, v, plan.offsets, plan.bias, dout, causal=causal, key_padding_mask=key_padding_mask
    )
    ds = xp.zeros_like(plan.s)
    xp.put_along_axis(ds, plan.offsets + (q.shape[2] - 1), dbias, axis=2)
    dc, dw = estimate_vjp_core(plan.c, w, ds, key_padding_mask=key_padding_mask)
    if cross_q is None:
        return FSATGrads(dq, dk, dv, dw, None, None)
    da, db = cross_vjp_core(cross_q, cross_k, dc, key_padding_mask=key_padding_mask)
    return FSATGrads(dq, dk, dv, dw, da, db)


# The overflow checks of dq, dk, dv, dw, dcross_q, dcross_k (refattn.checks.Overflow); plan_core and
# attention_core check the forward's intermediates.
_GRADIENT = "the gradient of the attention"
OVERFLOWS = {
    "attention_vjp": (checks.Overflow(_GRADIENT, ("dout", "v", "k")), checks.Overflow(_GRADIENT, ("dout", "v", "q")),
                      checks.Overflow(_GRADIENT, ("dout",)), checks.Overflow(_GRADIENT, ("dout", "v", "q", "k")),
                      checks.Overflow(_GRADIENT, ("dout", "v", "w", "cross_k")),
                      checks.Overflow(_GRADIENT, ("dout", "v", "w", "cross_q"))),
}


def attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    w: Any,
    top_k: int,
    dout: Any,
    *,
    causal: bool = False,
    key_padding_mask: Any = None,
    noise: Any = None,
    cross_q: Any = None,
    cross_k: Any = None,
) -> FSATGrads:
    """Gradient of :func:`attention`, with the truncation of spec/fsat.md step 4.

    The offsets are integers and carry no gradient. With (dq, dk, dv, dbias) the VJP of the sparse
    attention at the selected offsets and bias s[offsets]:

        ds  = dbias scattered to the selected offsets (0 elsewhere)
        dw  = estimate_vjp(c, w, ds).dw                           (w learns through the bias)
        (dcross_q, dcross_k) = cross_vjp(a, b, estimate_vjp(c, w, ds).dc)   only if given

    q and k receive gradient only through the sparse attention, never through the cross module,
    even when the cross inputs default to them (the estimator path is cut from q and k). Given
    cross inputs receive the estimator path's gradient.

    Args:
        q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k: the forward inputs.
        dout: cotangent of out, (B, H, L, Dv).

    Returns:
        FSATGrads(q, k, v, w, cross_q, cross_k), float64; the cross fields are None unless given.
    """
    q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k = check_attention_vjp(
        q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k
    )
    q, k, v, w, dout, noise, cross_q, cross_k = as_float64(q, k, v, w, dout, noise, cross_q, cross_k)
    grads = attention_vjp_core(q, k, v, w, top_k, dout, causal=causal, key_padding_mask=key_padding_mask,
                               noise=noise, cross_q=cross_q, cross_k=cross_k)
    checks.check_overflows(grads, OVERFLOWS["attention_vjp"], q=q, k=k, v=v, w=w, dout=dout, cross_q=cross_q,
                           cross_k=cross_k)
    return grads
