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
from ..device import cast, compute_dtype, on_device, result_dtype

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


def _window(x: Any, group: tuple[slice, slice], window: slice) -> Any:
    return None if x is None else x[group][:, :, window]


@on_device
def local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None) -> Any:
    q, k, v, block, causal, mask = reference.check_local_attention(q, k, v, block, causal, key_padding_mask)
    dtype = result_dtype(q, k, v)
    compute, xp = compute_dtype(dtype), checks.array_namespace(q)
    out = xp.empty(v.shape, dtype)
    for group, rows, window in _windows(q, v, block, compute.itemsize):
        x = [cast(_window(y, group, window), compute) for y in (q, k, v)]
        part = reference.local_attention_core(*x, block, causal=causal,
                                              key_padding_mask=None if mask is None else mask[group[0], window])
        checks.check_overflow(part, "the local attention", q=x[0], k=x[1])
        out[group][:, :, rows] = part[:, :, rows.start - window.start:rows.stop - window.start]
    return out


@on_device
def local_attention_vjp(q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False,
                        key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    q, k, v, block, dout, causal, mask = reference.check_local_attention_vjp(q, k, v, block, dout, causal,
                                                                             key_padding_mask)
    dtype = result_dtype(q, k, v, dout)
    compute, xp = compute_dtype(dtype), checks.array_namespace(q)
    dq, dk, dv = (xp.zeros(x.shape, compute) for x in (q, k, v))
    for group, rows, window in _windows(q, v, block, compute.itemsize):
        x = [cast(_window(y, group, window), compute) for y in (q, k, v)]
        inside = slice(rows.start - window.start, rows.stop - window.start)
        cotangent = xp.zeros(x[2].shape, compute)  # the halo rows' outputs belong to other windows
        cotangent[:, :, inside] = dout[group][:, :, rows]
        grads = reference.local_attention_vjp_core(*x, block, cotangent, causal=causal,
                                                   key_padding_mask=None if mask is None else mask[group[0], window])
        dq[group][:, :, rows] = grads[0][:, :, inside]
        dk[group][:, :, window] += grads[1]
        dv[group][:, :, window] += grads[2]
    where = "the gradient of the local attention"
    checks.check_overflow(dq, where, dout=dout, v=v, k=k)
    checks.check_overflow(dk, where, dout=dout, v=v, q=q)
    checks.check_overflow(dv, where, dout=dout)
    return tuple(cast(x, dtype) for x in (dq, dk, dv))


local_attention.__doc__ = reference.local_attention.__doc__
local_attention_vjp.__doc__ = reference.local_attention_vjp.__doc__
