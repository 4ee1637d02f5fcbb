"""FSAT step 3 on tensors (reference: :mod:`refattn.fsat.sparse_attention`).

Differs from the reference:

- ``sparse_attention`` is a ``torch.autograd.Function`` whose backward is the explicit VJP
  (:func:`sparse_attention_backward`); the forward saves q, k, v, offsets, out, lse and the
  (B, H, L, K) probabilities, O(B H L (K + D)), so the backward recomputes nothing.
- Row i is paired with row i + tau by one of two shifts: contiguous slices per (batch, head) on a
  CPU (:class:`SlicedShift`), a row gather and ``index_add_`` over (B * H * L, F) on a GPU
  (:class:`GatheredShift`); :func:`forced_shifts` takes either on any device (the backend's
  conformance strategies). No (B, H, L, K, D) tensor is built.
- The offsets' values are checked by :func:`refattn.checks.offsets_array` on a host copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from refattn import checks

from ..tensors import check_overflow, checked, compute_dtype, host_copy, same_dtype, tensors
from .cross import unmasked

__all__ = [
    "sparse_attention",
    "sparse_attention_vjp",
    "check_sparse_attention",
    "check_sparse_attention_vjp",
    "check_offsets",
    "sparse_attention_forward",
    "sparse_attention_backward",
    "SparseAttention",
    "SlicedShift",
    "GatheredShift",
    "SHIFT_KINDS",
    "forced_shifts",
    "shifts",
    "shifted_dots",
]


PRODUCT_CHUNK_ELEMENTS = 2**18  # rows x F of SlicedShift.dot's product buffer: 1 MiB in float32, in cache


class SlicedShift:
    """The three shifted-row primitives of one offset tau[b, h] by contiguous slices (CPU).

    For a pair (i, j = i + tau) inside [0, L): ``dot`` d[b, h, i] = <x[b, h, i], y[b, h, j]>;
    ``add_shifted`` t[b, h, i] += w[b, h, i] * y[b, h, j]; ``add_to_partner`` t[b, h, j] +=
    w[b, h, i] * x[b, h, i]. Rows without a partner take nothing (d = 0). One slice operation per
    (b, h): on a CPU a row gather or index_add_ over (B*H*L, F) costs 10-20x more than these.
    """

    def __init__(self, tau: torch.Tensor, length: int):
        self.spans = [[(max(0, -t), min(length, length - t), t) for t in row] for row in tau.tolist()]

    def _pairs(self):
        for b, row in enumerate(self.spans):
            for h, (first, end, t) in enumerate(row):
                if first < end:
                    yield b, h, slice(first, end), slice(first + t, end + t)

    def dot(self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The products and sums of ``linalg.vecdot``, a chunk of rows at a time through one reused
        buffer straight into d (``out``, any strides, if given): no (L, F) product per (b, h)
        allocated, faulted in and freed."""
        d = torch.empty(x.shape[:3], dtype=x.dtype, device=x.device) if out is None else out
        rows = max(1, PRODUCT_CHUNK_ELEMENTS // x.shape[3])
        product = x.new_empty(min(rows, x.shape[2]), x.shape[3])
        for b, row in enumerate(self.spans):
            for h, (first, end, tau) in enumerate(row):
                d[b, h, :first].zero_()
                d[b, h, max(end, first) :].zero_()  # rows without a partner, all of them when first >= end
                for start in range(first, end, rows):
                    stop = min(end, start + rows)
                    chunk = product[: stop - start]
                    torch.mul(x[b, h, start:stop], y[b, h, start + tau : stop + tau], out=chunk)
                    torch.sum(chunk, dim=-1, out=d[b, h, start:stop])
        return d

    def add_shifted(self, target: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
        for b, h, i, j in self._pairs():
            target[b, h, i].addcmul_(weight[b, h, i, None], y[b, h, j])

    def add_to_partner(self, target: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> None:
        for b, h, i, j in self._pairs():
            target[b, h, j].addcmul_(weight[b, h, i, None], x[b, h, i])


class GatheredShift:
    """:class:`SlicedShift`'s primitives by one row gather / index_add_ over (B*H*L, F) (GPUs).

    Rows without a partner are clamped to the sequence ends; their weights are 0 wherever these
    primitives are used (invalid pairs have probability and gradient exactly 0), and ``dot``
    zeroes them, so the clamping adds exact zeros.
    """

    def __init__(self, tau: torch.Tensor, length: int):
        batch, heads = tau.shape
        positions = torch.arange(length, device=tau.device)
        partner = positions + tau[:, :, None]  # (B, H, L)
        self.inside = (partner >= 0) & (partner < length)
        base = (torch.arange(batch * heads, device=tau.device) * length).view(batch, heads, 1)
        self.rows = (base + partner.clamp(0, length - 1)).reshape(-1)

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, y.shape[3]).index_select(0, self.rows).view(*y.shape[:3], y.shape[3])

    def dot(self, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d = torch.linalg.vecdot(x, self._gather(y))
        d = torch.where(self.inside, d, torch.zeros((), dtype=d.dtype, device=d.device))
        return d if out is None else out.copy_(d)

    def add_shifted(self, target: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
        target.addcmul_(weight[..., None], self._gather(y))

    def add_to_partner(self, target: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> None:
        flat = target.view(-1, target.shape[3])
        flat.index_add_(0, self.rows, (weight[..., None] * x).reshape(-1, x.shape[3]))


SHIFT_KINDS = {"sliced": SlicedShift, "gathered": GatheredShift}
_forced_shift_kind: str | None = None


@contextlib.contextmanager
def forced_shifts(kind: str) -> Iterator[None]:
    """Inside the block, pair rows by ``kind`` ("sliced" or "gathered") shifts on every device.

    The conformance suite checks both paths this way (the backend's ``strategies``); outside, the
    choice is by device. A process-wide setting: backward passes run inside the block follow it too.
    """
    global _forced_shift_kind
    checks.one_of(kind, "kind", tuple(SHIFT_KINDS))
    previous, _forced_shift_kind = _forced_shift_kind, kind
    try:
        yield
    finally:
        _forced_shift_kind = previous


def shifts(offsets: torch.Tensor, length: int) -> list[SlicedShift | GatheredShift]:
    """One shift per selected offset m: sliced on a CPU and gathered elsewhere, unless forced."""
    kind = _forced_shift_kind or ("sliced" if offsets.device.type == "cpu" else "gathered")
    return [SHIFT_KINDS[kind](offsets[:, :, m], length) for m in range(offsets.shape[2])]


def valid_pairs(offsets: torch.Tensor, length: int, causal: bool, unpadded: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, K) bool: the pair (i, i + tau_m) is inside [0, L), causal-allowed and unpadded."""
    positions = torch.arange(length, device=offsets.device)[:, None]
    tau = offsets[:, :, None, :]
    valid = (positions >= -tau) & (positions < length - tau)  # 0 <= i + tau < L; no int64 (B, H, L, K) partner
    if causal:
        valid &= (offsets <= 0)[:, :, None, :]
    if unpadded is not None:
        heads = offsets.shape[1]
        partner = positions + tau  # (B, H, L, K)
        unpadded_bh = unpadded[:, None, :].expand(unpadded.shape[0], heads, length)
        partner_unpadded = torch.gather(unpadded_bh, 2, partner.clamp(0, length - 1).flatten(2)).view(partner.shape)
        valid &= unpadded_bh[..., None] & partner_unpadded
    return valid


def shifted_dots(pairs: list[SlicedShift | GatheredShift], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, H, L, K): column m the dot products of :meth:`SlicedShift.dot` of the m-th shift, written in
    place (stacking K columns would hold them twice)."""
    dots = torch.empty(x.shape[:3] + (len(pairs),), dtype=x.dtype, device=x.device)
    for m, shift in enumerate(pairs):
        shift.dot(x, y, out=dots[..., m])
    return dots


def sparse_attention_forward(q, k, v, offsets, bias, causal, unpadded):
    """(out, lse, probs) of tensors of one compute dtype, probs (B, H, L, K) the softmax weights.

    The (B, H, L, K) logits are built offset by offset; no (B, H, L, K, D) tensor exists. The
    probabilities overwrite the logits: one (B, H, L, K) tensor lives when out is allocated.
    """
    length, dim = q.shape[2], q.shape[3]
    pairs = shifts(offsets, length)
    logits = shifted_dots(pairs, q, k).mul_(1.0 / math.sqrt(dim))
    if bias is not None:
        logits += bias[:, :, None, :]
    logits.masked_fill_(~valid_pairs(offsets, length, causal, unpadded), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = logits.sub_(safe[..., None]).exp_()  # 0 at invalid pairs; rows without a key are all 0
    out = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=v.dtype, device=v.device)
    for m, shift in enumerate(pairs):
        shift.add_shifted(out, probs[..., m], v)
    return out, lse, probs


def sparse_attention_backward(q, k, v, offsets, probs, lse, out, dout, dlse, has_bias):
    """(dq, dk, dv, dbias) of tensors of one compute dtype, from the forward's probabilities; the
    scatter to key j = i + tau_m is :meth:`SlicedShift.add_to_partner`."""
    length, dim = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim)
    pairs = shifts(offsets, length)
    row_term = torch.linalg.vecdot(dout, out)
    if dlse is not None:
        row_term -= torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    dz = shifted_dots(pairs, dout, v).sub_(row_term[..., None]).mul_(probs)  # probs * (dp - row_term), in place
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for m, shift in enumerate(pairs):
        shift.add_shifted(dq, dz[..., m], k)
        shift.add_to_partner(dk, dz[..., m], q)
        shift.add_to_partner(dv, probs[..., m], dout)
    dbias = dz.sum(dim=2) if has_bias else None
    return dq.mul_(scale), dk.mul_(scale), dv, dbias


class SparseAttention(torch.autograd.Function):
    """(out, lse) = sparse_attention(...) with :func:`sparse_attention_backward` as backward.

    Gradients are not checked for overflow here: under float16 loss scaling an inf gradient is
    expected, and ``torch.amp.GradScaler`` skips that step.
    """

    @staticmethod
    def forward(ctx, q, k, v, offsets, bias, unpadded, causal):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, probs = sparse_attention_forward(q, k, v, offsets, bias, causal, unpadded)
        ctx.save_for_backward(q, k, v, offsets, probs, lse, out)
        ctx.has_bias = bias is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, offsets, probs, lse, out = ctx.saved_tensors
        dq, dk, dv, dbias = sparse_attention_backward(q, k, v, offsets, probs, lse, out, dout.contiguous(), dlse,
                                                      ctx.has_bias)
        return dq, dk, dv, None, dbias, None, None


def check_offsets(offsets: torch.Tensor, batch: int, heads: int, length: int) -> torch.Tensor:
    """:func:`refattn.checks.offsets_array` of an integer tensor: int64, its values checked on a host
    copy (only the dtype, rank and shape while ``torch.compile`` traces)."""
    offsets = checks.index_array(offsets, "offsets", rank=3, axes="(B, H, K)")
    if checks.values_readable(offsets):
        checks.offsets_array(host_copy(offsets), batch, heads, length)
    else:
        checks.expect_shape(offsets, "offsets", (batch, heads, None), "(B, H, K)")
    return offsets


@checked
def check_sparse_attention(q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, causal: Any = False,
                           key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`sparse_attention`; returns them in that order (offsets as int64)."""
    q, k, v, offsets, bias, key_padding_mask = tensors(q=q, k=k, v=v, offsets=offsets, bias=bias,
                                                       key_padding_mask=key_padding_mask)
    checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    same_dtype(q=q, k=k, v=v)
    offsets = check_offsets(offsets, batch, heads, length)
    if bias is not None:
        checks.float_array(bias, "bias", rank=3, axes="(B, H, K)", allow_neg_inf=True)
        checks.expect_shape(bias, "bias", tuple(offsets.shape), "(B, H, K)")
    causal = checks.flag(causal, "causal")
    return q, k, v, offsets, bias, causal, checks.padding_mask(key_padding_mask, batch, length)


def sparse_attention(q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *, causal: bool = False,
                     key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, L, Dv), lse (B, H, L)) of q's dtype, differentiable in q, k, v and bias."""
    q, k, v, offsets, bias, causal, mask = check_sparse_attention(q, k, v, offsets, bias, causal, key_padding_mask)
    cd = compute_dtype(q.dtype)
    qc, kc = q.to(cd), k.to(cd)
    out, lse = SparseAttention.apply(qc, kc, v.to(cd), offsets, None if bias is None else bias.to(cd), unmasked(mask),
                                     causal)
    check_overflow(lse, "the sparse attention", allow_neg_inf=True, q=qc, k=kc)
    return out.to(q.dtype), lse.to(q.dtype)


@checked
def check_sparse_attention_vjp(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, dlse: Any = None,
                               causal: Any = False, key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`sparse_attention_vjp`; returns them in that order."""
    q, dout, dlse = tensors(q=q, dout=dout, dlse=dlse)
    q, k, v, offsets, bias, causal, mask = check_sparse_attention(q, k, v, offsets, bias, causal, key_padding_mask)
    batch, heads, length, _ = q.shape
    checks.sequence(dout, "dout", "(B, H, L, Dv)", (batch, heads, length), feature=v.shape[3])
    if dlse is not None:
        checks.float_array(dlse, "dlse", rank=3, axes="(B, H, L)")
        checks.expect_shape(dlse, "dlse", (batch, heads, length), "(B, H, L)")
    return q, k, v, offsets, bias, dout, dlse, causal, mask


def sparse_attention_vjp(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any = None,
                         causal: bool = False, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) of the inputs' dtypes; dbias is None without bias."""
    q, k, v, offsets, bias, dout, dlse, causal, mask = check_sparse_attention_vjp(
        q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask)
    cd = compute_dtype(q.dtype)
    with torch.no_grad():
        qc, kc, vc, doutc = q.to(cd), k.to(cd), v.to(cd), dout.to(cd)
        bias_c = None if bias is None else bias.to(cd)
        out, lse, probs = sparse_attention_forward(qc, kc, vc, offsets, bias_c, causal, unmasked(mask))
        dq, dk, dv, dbias = sparse_attention_backward(
            qc, kc, vc, offsets, probs, lse, out, doutc, None if dlse is None else dlse.to(cd), bias is not None
        )
    where = "the gradient of the sparse attention"
    check_overflow(dq, where, dout=doutc, v=vc, k=kc)
    check_overflow(dk, where, dout=doutc, v=vc, q=qc)
    check_overflow(dv, where, dout=doutc)
    if dbias is not None:
        check_overflow(dbias, where, dout=doutc, v=vc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype)
