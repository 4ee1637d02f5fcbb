"""FSAT end to end on tensors (reference: :mod:`refattn.fsat.attention`).

Differs from the reference:

- ``attention`` is differentiable with ``torch.autograd``; the truncation of spec/fsat.md step 4 is
  built in: the planning steps see *detached* q and k, so q and k get gradient only through the
  sparse attention (:class:`~refattn.backends.torch.fsat.sparse_attention.SparseAttention`), w
  through the bias s[offsets], given cross inputs through the estimator path (the autograd
  :class:`~refattn.backends.torch.fsat.cross.Cross`), and the offsets none.
- Without cross inputs the cross is never formed: the scores come from the spectrum
  (:func:`~refattn.backends.torch.fsat.estimate.estimate_of_cross`). When those scores overflow,
  the cross is formed to say whether it was the cross or the estimate that did.
- ``attention_vjp`` is the sparse attention's explicit backward plus the autograd VJP of the
  planning steps at dbias; ``attention_with_offsets`` also returns the offsets (used by the layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from refattn import checks
from refattn.fsat import FSATGrads
from refattn.fsat.attention import OVERFLOWS
from refattn.fsat.sparse_attention import OVERFLOWS as SPARSE_OVERFLOWS

from ..tensors import check_overflow, check_overflows, checked, compute_dtype, same_dtype, tensors
from .cross import Cross, cross_core, has_pairs, unmasked
from .estimate import estimate_core, estimate_of_cross
from .select import select_core
from .sparse_attention import SparseAttention, sparse_attention_backward, sparse_attention_forward

__all__ = [
    "FSATGrads",
    "Plan",
    "attention",
    "attention_vjp",
    "attention_with_offsets",
    "check_attention",
    "check_attention_vjp",
    "plan",
]


@checked
def check_attention(q: Any, k: Any, v: Any, w: Any, top_k: Any, causal: Any = False, key_padding_mask: Any = None,
                    noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`attention`; returns them in that order."""
    q, k, v, w, key_padding_mask, noise, cross_q, cross_k = tensors(
        q=q, k=k, v=v, w=w, key_padding_mask=key_padding_mask, noise=noise, cross_q=cross_q, cross_k=cross_k)
    checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    same_dtype(q=q, k=k, v=v)
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    if cross_q is not None:
        checks.sequence(cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        checks.sequence(cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=cross_q.shape[3])
        same_dtype(cross_q=cross_q, cross_k=cross_k)
    features = dim if cross_q is None else cross_q.shape[3]
    checks.float_array(w, "w", rank=2, axes="(H, Dc)")
    checks.expect_shape(w, "w", (heads, features), "(H, Dc)")
    top_k = checks.integer_in_range(top_k, "top_k", low=1)
    causal = checks.flag(causal, "causal")
    mask = checks.padding_mask(key_padding_mask, batch, length)
    if noise is not None:
        checks.float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        checks.expect_shape(noise, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    return q, k, v, w, top_k, causal, mask, noise, cross_q, cross_k


class Plan(NamedTuple):
    """Steps 1-2 in the compute dtype: the offsets (B, H, K_eff) int64 and their bias s[offsets]."""

    offsets: torch.Tensor
    bias: torch.Tensor


def plan(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int, causal: bool, mask: torch.Tensor | None,
         noise: torch.Tensor | None, cross_q: torch.Tensor | None, cross_k: torch.Tensor | None) -> Plan:
    """Steps 1-2 of validated tensors, each cast to the compute dtype; autograd flows per step 4.

    Raises ``ValueError`` naming the user's arguments when the cross or the estimate overflows.
    """
    cd = compute_dtype(q.dtype)
    length = q.shape[2]
    unpadded = unmasked(mask)
    wc = w.to(cd)
    if cross_q is not None:
        a, b = cross_q.to(cd), cross_k.to(cd)
        names = ("cross_q", "cross_k")
        c = Cross.apply(a, b, unpadded)
        check_overflow(c, "the cross", **dict(zip(names, (a, b), strict=True)))
        s = estimate_core(c, wc, has_pairs(length, unpadded, q.device))
    else:  # step 4: the estimator path is cut from q and k
        a, b = q.detach().to(cd), k.detach().to(cd)
        names = ("q", "k")
        s = estimate_of_cross(a, b, wc, unpadded)
    operands = dict(zip(names, (a, b), strict=True))
    try:
        check_overflow(s, "the estimate", allow_neg_inf=True, **operands, w=wc)
    except ValueError:
        check_overflow(cross_core(a.detach(), b.detach(), unpadded), "the cross", **operands)
        raise
    noisy = s.detach() if noise is None else s.detach() + noise.detach().to(cd)
    offsets = select_core(noisy, top_k, causal)
    return Plan(offsets, torch.gather(s, 2, offsets + (length - 1)))


def attention(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None,
              noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> torch.Tensor:
    """out (B, H, L, Dv) of q's dtype, differentiable in q, k, v, w, cross_q, cross_k (with step 4's truncation)."""
    out, _ = attention_with_offsets(q, k, v, w, top_k, causal=causal, key_padding_mask=key_padding_mask,
                                    noise=noise, cross_q=cross_q, cross_k=cross_k)
    return out


def attention_with_offsets(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False,
                           key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                           cross_k: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` that also returns the selected offsets (B, H, K_eff)."""
    q, k, v, w, top_k, causal, mask, noise, cross_q, cross_k = check_attention(
        q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    cd = compute_dtype(q.dtype)
    offsets, bias = plan(q, k, w, top_k, causal, mask, noise, cross_q, cross_k)
    qc, kc = q.to(cd), k.to(cd)
    out, lse = SparseAttention.apply(qc, kc, v.to(cd), offsets, bias, unmasked(mask), causal)
    check_overflows((out, lse), SPARSE_OVERFLOWS["sparse_attention"], q=qc, k=kc)
    return out.to(q.dtype), offsets


@checked
def check_attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: Any, dout: Any, causal: Any = False,
                        key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                        cross_k: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`attention_vjp`; returns them in that order."""
    q, dout = tensors(q=q, dout=dout)
    q, k, v, w, top_k, causal, mask, noise, cross_q, cross_k = check_attention(
        q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    checks.sequence(dout, "dout", "(B, H, L, Dv)", tuple(q.shape[:3]), feature=v.shape[3])
    return q, k, v, w, top_k, dout, causal, mask, noise, cross_q, cross_k


def attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False,
                  key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                  cross_k: Any = None) -> FSATGrads:
    """``FSATGrads`` of the inputs' dtypes (the cross fields only when given), with step 4's truncation."""
    q, k, v, w, top_k, dout, causal, mask, noise, cross_q, cross_k = check_attention_vjp(
        q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k)
    cd = compute_dtype(q.dtype)
    w_leaf = w.detach().to(cd).requires_grad_()
    cross_leaves = (None, None) if cross_q is None else tuple(x.detach().to(cd).requires_grad_()
                                                            for x in (cross_q, cross_k))
    with torch.enable_grad():
        offsets, bias = plan(q.detach(), k.detach(), w_leaf, top_k, causal, mask, noise, *cross_leaves)
    with torch.no_grad():
        qc, kc, vc, doutc = q.detach().to(cd), k.detach().to(cd), v.detach().to(cd), dout.to(cd)
        out, lse, probs = sparse_attention_forward(qc, kc, vc, offsets, bias.detach(), causal, unmasked(mask))
        dq, dk, dv, dbias = sparse_attention_backward(qc, kc, vc, offsets, probs, lse, out, doutc, None, True)
    dw, *grads_cross = torch.autograd.grad(bias, [w_leaf, *(x for x in cross_leaves if x is not None)], dbias)
    check_overflows((dq, dk, dv, dw, *grads_cross), OVERFLOWS["attention_vjp"], q=qc, k=kc, v=vc, w=w_leaf,
                    dout=doutc, cross_q=cross_leaves[0], cross_k=cross_leaves[1])
    if cross_q is None:
        return FSATGrads(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype), None, None)
    return FSATGrads(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(w.dtype),
                     grads_cross[0].to(cross_q.dtype), grads_cross[1].to(cross_k.dtype))
