"""FSAT end to end: cross -> estimate -> select -> sparse attention (spec/fsat.md), and its gradient
with the truncation of step 4.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refattn._validation import expect_shape, float_array, integer_in_range, padding_mask, sequence

from .cross import cross, cross_vjp
from .estimate import estimate, estimate_vjp
from .select import select
from .sparse_attention import sparse_attention, sparse_attention_vjp

__all__ = ["FSATGrads", "attention", "attention_vjp"]


class FSATGrads(NamedTuple):
    """Gradients returned by :func:`attention_vjp`; ``cross_q``/``cross_k`` are None unless given."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray
    cross_q: np.ndarray | None
    cross_k: np.ndarray | None


class _Plan(NamedTuple):
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray
    a: np.ndarray  # cross inputs: cross_q or q
    b: np.ndarray  # cross_k or k
    separate: bool  # were cross_q/cross_k given?
    mask: np.ndarray | None
    c: np.ndarray  # (B, H, 2L-1, Dc)
    s: np.ndarray  # (B, H, 2L-1)
    offsets: np.ndarray  # (B, H, K_eff)
    bias: np.ndarray  # (B, H, K_eff) = s at the offsets


def _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k) -> _Plan:
    """Validate every input, then run steps 1-2 (cross, estimate, select)."""
    q = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    separate = cross_q is not None
    if separate:
        a = sequence(cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        b = sequence(cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=a.shape[3])
    else:
        a, b = q, k
    w = float_array(w, "w", rank=2, axes="(H, Dc)")
    expect_shape(w, "w", (heads, a.shape[3]), "(H, Dc)")
    top_k = integer_in_range(top_k, "top_k", low=1)
    mask = padding_mask(key_padding_mask, batch, length)
    if noise is not None:
        noise = float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(noise, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    c = cross(a, b, key_padding_mask=mask)
    s = estimate(c, w, key_padding_mask=mask)
    offsets = select(s, top_k, causal=causal, noise=noise)
    bias = np.take_along_axis(s, offsets + (length - 1), axis=2)
    return _Plan(q, k, v, w, a, b, separate, mask, c, s, offsets, bias)


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
    plan = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    q, k, v, offsets, bias, mask = plan.q, plan.k, plan.v, plan.offsets, plan.bias, plan.mask
    del plan  # frees the (B, H, 2L - 1, Dc) cross before the attention runs
    out, _ = sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    return out


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
    plan = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    dq, dk, dv, dbias = sparse_attention_vjp(
        plan.q, plan.k, plan.v, plan.offsets, plan.bias, dout, causal=causal, key_padding_mask=plan.mask
    )
    length = plan.q.shape[2]
    ds = np.zeros_like(plan.s)
    np.put_along_axis(ds, plan.offsets + (length - 1), dbias, axis=2)
    dc, dw = estimate_vjp(plan.c, plan.w, ds, key_padding_mask=plan.mask)
    if not plan.separate:
        return FSATGrads(dq, dk, dv, dw, None, None)
    da, db = cross_vjp(plan.a, plan.b, dc, key_padding_mask=plan.mask)
    return FSATGrads(dq, dk, dv, dw, da, db)
