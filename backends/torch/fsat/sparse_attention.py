"""FSAT step 3 on tensors (reference: :mod:`refattn.fsat.sparse_attention`).

Differs from the reference:

- ``sparse_attention`` is a ``torch.autograd.Function`` whose backward is the explicit VJP
  (:func:`sparse_attention_backward`); the forward saves q, k, v, offsets, out, lse and the
  (B, H, L, K) probabilities, O(B H L (K + D)), so the backward recomputes nothing.
- Three paths compute it (:data:`PATHS`). On a CPU the fused kernels of :mod:`..kernels` take each row's
  K pairs, softmax and output in one pass (``"fused"``); without g++, contiguous slices per (batch, head,
  chunk of rows), all K offsets per chunk (:class:`SlicedShift`, ``"sliced"``). On a GPU a row gather and
  ``index_add_`` over (B * H * L, F) (:class:`GatheredShift`, ``"gathered"``). :func:`forced_path` takes
  one on any device where it exists (the backend's conformance strategies). No (B, H, L, K, D) tensor is built.
- The offsets' values are checked by :func:`refattn.checks.offsets_array` on a host copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from refattn import checks
from refattn.fsat.sparse_attention import OVERFLOWS

from .. import kernels
from ..tensors import check_overflows, checked, compute_dtype, host_copy, same_dtype, tensors
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
    "PATHS",
    "forced_path",
    "path_for",
    "shifts",
    "shifted_dots",
    "shifted_sum",
    "row_dots",
    "row_logsumexp",
    "partner_sum",
    "sliced_chunks",
]


CHUNK_ELEMENTS = 2**18  # rows x F of a product buffer (shifted_dots, row_dots): 1 MiB in float32, stays in cache
SUM_CHUNK_ELEMENTS = 2**20  # rows x F of a chunk of shifted_sum's target: 4 MiB, in the last-level cache while
# the K offsets add to it; smaller chunks mean more (parallel) ops per target, each with its own thread start


class SlicedShift:
    """One offset tau[b, h] paired by contiguous slices (CPU): row i with row i + tau for
    i in [first, end) = [max(0, -tau), min(L, L - tau)), per (b, h) in ``spans``.

    The K shifts are applied together, chunk of target rows by chunk (:func:`shifted_dots`,
    :func:`shifted_sum`, :func:`partner_sum`): each chunk takes the K offsets' terms while it is in
    cache, in the order m = 0..K-1 of one pass per offset (same sums, bit for bit), instead of K
    passes over the whole (L, F) target. One slice operation per (b, h, chunk, offset): on a CPU a
    row gather or index_add_ over (B*H*L, F) costs 10-20x more than these.
    """

    def __init__(self, tau: torch.Tensor, length: int):
        self.spans = [[(max(0, -t), min(length, length - t), t) for t in row] for row in tau.tolist()]


def sliced_chunks(pairs: list[SlicedShift], shape: torch.Size, features: int,
                  elements: int) -> Iterator[tuple[Any, ...]]:
    """(b, h, start, stop, spans) per chunk of rows [start, stop) of (b, h), ``elements // features`` rows each;
    spans[m] = (first, end, tau)."""
    batch, heads, length = shape[:3]
    rows = max(1, elements // max(1, features))
    for b in range(batch):
        for h in range(heads):
            spans = [pair.spans[b][h] for pair in pairs]
            for start in range(0, length, rows):
                yield b, h, start, min(length, start + rows), spans


class GatheredShift:
    """One offset tau[b, h] paired by one row gather / index_add_ over (B*H*L, F) (GPUs), one offset at a time:
    ``dot`` d[b, h, i] = <x[b, h, i], y[b, h, j]>, ``add_shifted`` t[b, h, i] += w[b, h, i] * y[b, h, j],
    ``add_to_partner`` t[b, h, j] += w[b, h, i] * x[b, h, i], for j = i + tau.

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
PATHS = ("fused", *SHIFT_KINDS)
_forced_path: str | None = None


@contextlib.contextmanager
def forced_path(kind: str) -> Iterator[None]:
    """Inside the block, compute the sparse attention by ``kind`` (one of :data:`PATHS`) on every device where
    it exists ("fused": CPU tensors, with g++).

    The conformance suite checks every path this way (the backend's ``strategies``); outside, the
    choice is by device. A process-wide setting: backward passes run inside the block follow it too.
    """
    global _forced_path
    checks.one_of(kind, "kind", PATHS)
    previous, _forced_path = _forced_path, kind
    try:
        yield
    finally:
        _forced_path = previous


def path_for(x: torch.Tensor) -> str:
    """The path for tensors of x's device and dtype: the forced one, else fused on a CPU (sliced where the
    kernels cannot be built), gathered elsewhere."""
    if _forced_path == "fused" and not kernels.available(x):
        reason = kernels.unavailable() or f"its kernels take float32 or float64 CPU tensors, got {x.dtype} on " \
            f"{x.device}"
        raise RuntimeError(f"the fused path cannot run: {reason}")
    if _forced_path is not None:
        return _forced_path
    if x.device.type == "cpu":
        return "fused" if kernels.available(x) else "sliced"
    return "gathered"


def shifts(offsets: torch.Tensor, length: int, kind: str) -> list[SlicedShift | GatheredShift]:
    """One shift of ``kind`` ("sliced" or "gathered") per selected offset m."""
    return [SHIFT_KINDS[kind](offsets[:, :, m], length) for m in range(offsets.shape[2])]


def valid_pairs(offsets: torch.Tensor, length: int, causal: bool, unpadded: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, K) bool: the pair (i, i + tau_m) is inside [0, L), causal-allowed and unpadded."""
    positions = torch.arange(length, device=offsets.device)[:, None]
    tau = offsets[:, :, None, :]
    valid = positions >= -tau
    valid &= positions < length - tau  # 0 <= i + tau < L; no int64 (B, H, L, K) partner
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
    """(B, H, L, K): d[b, h, i, m] = <x[b, h, i], y[b, h, i + tau_m]> (``linalg.vecdot``'s products and
    sums), 0 for rows without a partner. Sliced shifts go chunk of x's rows by chunk, through one reused
    product buffer straight into d: no (L, F) product allocated, x's chunk read once for the K offsets."""
    dots = torch.empty(x.shape[:3] + (len(pairs),), dtype=x.dtype, device=x.device)
    if not all(isinstance(pair, SlicedShift) for pair in pairs):
        for m, shift in enumerate(pairs):
            shift.dot(x, y, out=dots[..., m])
        return dots
    product = None
    for b, h, start, stop, spans in sliced_chunks(pairs, x.shape, x.shape[3], CHUNK_ELEMENTS):
        if product is None:
            product = x.new_empty(stop - start, x.shape[3])
        x_bh, y_bh, block = x[b, h], y[b, h], dots[b, h, start:stop].T  # block: (K, rows), a view
        if any(first > start or end < stop for first, end, _ in spans):
            block.zero_()  # rows without a partner: one contiguous fill, not up to 2K strided column ones
        for m, (first, end, tau) in enumerate(spans):
            low, high = max(start, first), min(stop, end)
            if low < high:  # one (b, h, chunk, offset) costs a few small ops: views taken once per chunk
                chunk = product[: high - low]
                torch.mul(x_bh[low:high], y_bh[low + tau : high + tau], out=chunk)
                torch.sum(chunk, dim=-1, out=block[m, low - start : high - start])
    return dots


def row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, H, L): d[b, h, i] = <x[b, h, i], y[b, h, i]>, ``linalg.vecdot``'s products and sums; on a CPU a
    chunk of rows at a time through one reused buffer (vecdot's (B, H, L, F) product would be a fresh tensor
    as large as x, written, page-faulted in and read once)."""
    if x.device.type != "cpu":
        return torch.linalg.vecdot(x, y)
    d = torch.empty(x.shape[:3], dtype=x.dtype, device=x.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[3]))
    product = x.new_empty(min(rows, x.shape[2]), x.shape[3])
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for start in range(0, x.shape[2], rows):
                stop = min(x.shape[2], start + rows)
                chunk = product[: stop - start]
                torch.mul(x[b, h, start:stop], y[b, h, start:stop], out=chunk)
                torch.sum(chunk, dim=-1, out=d[b, h, start:stop])
    return d


def shifted_sum(pairs: list[SlicedShift | GatheredShift], weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """t (B, H, L, F): t[b, h, i] = sum_m weight[b, h, i, m] y[b, h, i + tau_m] over the pairs inside
    [0, L), added in the order m = 0..K-1 (the gather)."""
    return _weighted_sum(pairs, weight, y, to_partner=False)


def partner_sum(pairs: list[SlicedShift | GatheredShift], weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B, H, L, F): t[b, h, j] = sum_m weight[b, h, j - tau_m, m] x[b, h, j - tau_m] over the pairs
    inside [0, L), added in the order m = 0..K-1 (the scatter to key j = i + tau_m)."""
    return _weighted_sum(pairs, weight, x, to_partner=True)


def _weighted_sum(pairs, weight, source, to_partner):
    """:func:`shifted_sum` and :func:`partner_sum`; sliced shifts fill the target chunk by chunk of its
    rows (torch.empty: each row written while in cache, no zero-filled pass ahead of the sums)."""
    if not all(isinstance(pair, SlicedShift) for pair in pairs):
        target = torch.zeros(weight.shape[:3] + (source.shape[3],), dtype=source.dtype, device=source.device)
        for m, shift in enumerate(pairs):
            add = shift.add_to_partner if to_partner else shift.add_shifted
            add(target, weight[..., m], source)
        return target
    target = torch.empty(weight.shape[:3] + (source.shape[3],), dtype=source.dtype, device=source.device)
    for b, h, start, stop, spans in sliced_chunks(pairs, target.shape, target.shape[3], SUM_CHUNK_ELEMENTS):
        chunk = target[b, h, start:stop].zero_()
        columns, source_bh = weight[b, h, :, :, None].transpose(0, 1), source[b, h]  # columns: (K, L, 1), a view
        for m, (first, end, tau) in enumerate(spans):
            if to_partner:  # target row j = i + tau takes weight and source row i
                low, high = max(start, first + tau), min(stop, end + tau)
                weight_rows = source_rows = slice(low - tau, high - tau)
            else:  # target row i takes weight row i and source row i + tau
                low, high = max(start, first), min(stop, end)
                weight_rows, source_rows = slice(low, high), slice(low + tau, high + tau)
            if low < high:
                chunk[low - start : high - start].addcmul_(columns[m, weight_rows], source_bh[source_rows])
    return target


LOGSUMEXP_CHUNK_ROWS = 2**16  # rows of (B * H * L, K) logits per logsumexp on a CPU: its temporary stays small


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, dim=-1)``; on a CPU a chunk of rows at a time (its exp temporary is as large
    as its input: a fresh (B, H, L, K) tensor at once, a reused small one by chunks)."""
    if logits.device.type != "cpu" or logits.numel() == 0:  # empty: no rows to chunk (K = 0 has no -1 reshape)
        return torch.logsumexp(logits, dim=-1)
    lse = torch.empty(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    flat, flat_lse = logits.reshape(-1, logits.shape[-1]), lse.view(-1)
    for start in range(0, flat.shape[0], LOGSUMEXP_CHUNK_ROWS):
        stop = min(flat.shape[0], start + LOGSUMEXP_CHUNK_ROWS)
        torch.logsumexp(flat[start:stop], dim=-1, out=flat_lse[start:stop])
    return lse


def sparse_attention_forward(q, k, v, offsets, bias, causal, unpadded):
    """(out, lse, probs) of tensors of one compute dtype, probs (B, H, L, K) the softmax weights, by the
    path :func:`path_for` chooses.

    The (B, H, L, K) logits are built offset by offset; no (B, H, L, K, D) tensor exists. The
    probabilities overwrite the logits: one (B, H, L, K) tensor lives when out is allocated.
    """
    path = path_for(q)
    if path == "fused":
        return kernels.sparse_forward(q, k, v, offsets, bias, causal, unpadded)
    length, dim = q.shape[2], q.shape[3]
    pairs = shifts(offsets, length, path)
    logits = shifted_dots(pairs, q, k).mul_(1.0 / math.sqrt(dim))
    invalid = valid_pairs(offsets, length, causal, unpadded).logical_not_()
    if bias is not None:  # a bias of -inf removes its offset, whatever q . k is (not inf - inf = NaN)
        removed = (bias == float("-inf"))[:, :, None, :]
        logits += bias[:, :, None, :].masked_fill(removed, 0.0)
        invalid |= removed
    logits.masked_fill_(invalid, float("-inf"))
    del invalid  # a (B, H, L, K) mask: freed before out is allocated, not part of the peak
    lse = row_logsumexp(logits)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = logits.sub_(safe[..., None]).exp_()  # 0 at invalid pairs; rows without a key are all 0
    return shifted_sum(pairs, probs, v), lse, probs


def sparse_attention_backward(q, k, v, offsets, probs, lse, out, dout, dlse, has_bias):
    """(dq, dk, dv, dbias) of tensors of one compute dtype, from the forward's probabilities, by the path
    :func:`path_for` chooses; on the shift paths the scatter to key j = i + tau_m is ``add_to_partner``."""
    path = path_for(q)
    if path == "fused":
        return kernels.sparse_backward(q, k, v, offsets, probs, lse, out, dout, dlse, has_bias)
    length, dim = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim)
    pairs = shifts(offsets, length, path)
    row_term = row_dots(dout, out)
    if dlse is not None:
        row_term -= torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    dz = shifted_dots(pairs, dout, v).sub_(row_term[..., None]).mul_(probs)  # probs * (dp - row_term), in place
    dq = shifted_sum(pairs, dz, k)
    dk = partner_sum(pairs, dz, q)
    dv = partner_sum(pairs, probs, dout)
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
    check_overflows((out, lse), OVERFLOWS["sparse_attention"], q=qc, k=kc)
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
    check_overflows((dq, dk, dv, dbias), OVERFLOWS["sparse_attention_vjp"], q=qc, k=kc, v=vc, dout=doutc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype)
