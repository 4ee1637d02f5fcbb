"""Routing step 6 on CuPy arrays: :mod:`refattn.routing.local_attention` in the compute dtype, on groups of
heads and runs of blocks whose (blocks, W, 3W) logits fit the chunk budget. A run of query blocks
[n0, n1) sees keys in blocks n0 - 1 to n1 only, so the reference's core runs on that window of the
sequence, which starts on a block boundary, and the rows of its first and last (halo) blocks are
dropped; the gradient gives the halo rows a zero cotangent, so that they add nothing to the keys'.
"""

from __future__ import annotations

import importlib
from typing import Any

from refattn import checks

from .. import memory
from ..device import cast, compute_dtype, mirror, result_dtype

reference = importlib.import_module("refattn.routing.local_attention")


def _windows(q: Any, v: Any, block: int, itemsize: int) -> list[tuple[tuple[slice, slice], slice, slice]]:
    """(group of heads, query rows, key window) triples covering (B, H, L)."""
    batch, heads, length, dim = q.shape
    block = min(block, length)
    blocks = -(-length // block)
    runs, heads_per = memory.local_runs(blocks, memory.per_chunk(memory.local_block(block, dim, v.shape[3], itemsize)))
    rows = [(n * block, min(length, (n + runs) * block)) for n in range(0, blocks, runs)]
    return [(group, slice(start, stop), slice(max(0, start - block), min(length, stop + block)))
            for group in memory.groups(batch, heads, heads_per) for start, stop in rows]


def _local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool, key_padding_mask: Any) -> Any:
    dtype, xp, mask = result_dtype(q, k, v), checks.array_namespace(q), key_padding_mask
    compute, out = compute_dtype(dtype), xp.empty(v.shape, dtype)
    for group, rows, window in _windows(q, v, block, compute.itemsize):
        x = [cast(y[group][:, :, window], compute) for y in (q, k, v)]
        part = reference.local_attention_core(*x, block, causal=causal,
                                              key_padding_mask=None if mask is None else mask[group[0], window])
        checks.check_overflows(part, reference.OVERFLOWS["local_attention"], q=x[0], k=x[1])
        out[group][:, :, rows] = part[:, :, rows.start - window.start:rows.stop - window.start]
    return out


def _local_attention_vjp(q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool,
                         key_padding_mask: Any) -> tuple[Any, Any, Any]:
    compute, xp, mask = compute_dtype(result_dtype(q, k, v, dout)), checks.array_namespace(q), key_padding_mask
    dq, dk, dv = (xp.zeros(x.shape, compute) for x in (q, k, v))
    for group, rows, window in _windows(q, v, block, compute.itemsize):
        x = [cast(y[group][:, :, window], compute) for y in (q, k, v)]
        inside = slice(rows.start - window.start, rows.stop - window.start)
        cotangent = xp.zeros(x[2].shape, compute)  # the halo rows' outputs belong to other windows
        cotangent[:, :, inside] = dout[group][:, :, rows]
        grads = reference.local_attention_vjp_core(*x, block, cotangent, causal=causal,
                                                   key_padding_mask=None if mask is None else mask[group[0], window])
        dq[group][:, :, rows] = grads[0][:, :, inside]
        dk[group][:, :, window] += grads[1]
        dv[group][:, :, window] += grads[2]
    return dq, dk, dv


local_attention = mirror(reference.local_attention, _local_attention, compute=False, overflow=())  # checked above

local_attention_vjp = mirror(reference.local_attention_vjp, _local_attention_vjp, compute=False)
