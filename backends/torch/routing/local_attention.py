"""Routing step 6 on tensors (reference: :mod:`refattn.routing.local_attention`).

Differs from the reference: the sequence is padded to whole blocks and every block's keys (the
previous, own and, not causal, next block) gathered at once: (B, H, L/B, B, 2B or 3B) logits, with
:func:`~refattn.backends.torch.routing.cluster_attention.masked_softmax`; the gradients are autograd's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refattn import checks
from refattn.routing.local_attention import OVERFLOWS

from ..tensors import check_overflows, checked, compute_dtype, same_dtype, tensors, vjp
from .cluster_attention import masked_softmax

__all__ = ["local_attention", "local_attention_vjp", "check_local_attention", "check_local_attention_vjp",
           "local_attention_core"]


def local_attention_core(q, k, v, block: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Blocked local attention of compute-dtype tensors (no checks); differentiable in q, k, v."""
    batch, heads, length, dim = q.shape
    device = q.device
    width = min(block, length)
    blocks = -(-length // width)
    total = blocks * width
    extra = total - length
    if extra:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
    queries = torch.arange(total, device=device).reshape(blocks, width)  # (N, B)
    parts = [queries - width, queries] if causal else [queries - width, queries, queries + width]
    keys = torch.cat(parts, dim=1)  # (N, 2B or 3B): the previous, own (and next) block
    key_index = keys.clamp(0, total - 1).reshape(-1)
    span = keys.shape[1]
    qb = q.reshape(batch, heads, blocks, width, dim)
    kb = k.index_select(2, key_index).reshape(batch, heads, blocks, span, dim)
    vb = v.index_select(2, key_index).reshape(batch, heads, blocks, span, v.shape[3])
    valid = ((keys >= 0) & (keys < length)).unsqueeze(1) & (queries < length).unsqueeze(-1)  # (N, B, span)
    if causal:
        valid = valid & (keys.unsqueeze(1) <= queries.unsqueeze(-1))
    valid = valid.unsqueeze(0).unsqueeze(0)  # (1, 1, N, B, span)
    if mask is not None:
        unpadded = torch.nn.functional.pad(~mask, (0, extra), value=False)  # (B, total)
        key_ok = unpadded.index_select(1, key_index).reshape(batch, blocks, span)
        query_ok = unpadded.reshape(batch, blocks, width)
        valid = valid & (key_ok.unsqueeze(2) & query_ok.unsqueeze(-1)).unsqueeze(1)
    logits = torch.matmul(qb, kb.transpose(-1, -2)) * (1.0 / math.sqrt(dim))
    out = torch.matmul(masked_softmax(logits, valid), vb)
    return out.reshape(batch, heads, total, v.shape[3])[:, :, :length]


@checked
def check_local_attention(q: Any, k: Any, v: Any, block: Any, causal: Any = False,
                          key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`local_attention`; returns them in that order."""
    q, k, v, key_padding_mask = tensors(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    same_dtype(q=q, k=k, v=v)
    block = checks.integer_in_range(block, "block", low=1)
    causal = checks.flag(causal, "causal")
    return q, k, v, block, causal, checks.padding_mask(key_padding_mask, batch, length)


def local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool = False,
                    key_padding_mask: Any = None) -> torch.Tensor:
    """out (B, H, L, Dv) of q's dtype, differentiable in q, k, v."""
    q, k, v, block, causal, mask = check_local_attention(q, k, v, block, causal, key_padding_mask)
    cd = compute_dtype(q.dtype)
    qc, kc = q.to(cd), k.to(cd)
    out = local_attention_core(qc, kc, v.to(cd), block, causal, mask)
    check_overflows(out, OVERFLOWS["local_attention"], q=qc, k=kc)
    return out.to(q.dtype)


@checked
def check_local_attention_vjp(q: Any, k: Any, v: Any, block: Any, dout: Any, causal: Any = False,
                              key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`local_attention_vjp`; returns them in that order."""
    q, dout = tensors(q=q, dout=dout)
    q, k, v, block, causal, mask = check_local_attention(q, k, v, block, causal, key_padding_mask)
    checks.float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    checks.expect_shape(dout, "dout", tuple(v.shape), "(B, H, L, Dv)")
    return q, k, v, block, dout, causal, mask


def local_attention_vjp(q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False,
                        key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the inputs' dtypes."""
    q, k, v, block, dout, causal, mask = check_local_attention_vjp(q, k, v, block, dout, causal, key_padding_mask)
    cd = compute_dtype(q.dtype)
    qc, kc, vc, doutc = q.to(cd), k.to(cd), v.to(cd), dout.to(cd)
    dq, dk, dv = vjp(lambda a, b, c: local_attention_core(a, b, c, block, causal, mask), [qc, kc, vc], [doutc])
    check_overflows((dq, dk, dv), OVERFLOWS["local_attention_vjp"], q=qc, k=kc, v=vc, dout=doutc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
