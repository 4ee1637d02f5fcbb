"""FSAT step 3 on CuPy arrays: :mod:`refattn.fsat.sparse_attention`'s checks, then the fused CUDA kernels of
kernels/fsat_sparse_attention.cu in place of its core: one warp per row, an online softmax over the K
offsets, nothing of size L x K x D stored. The kernels read q, k, v in their dtype (float16 included) and
accumulate in float64 or float32; they are launched on groups of heads, so that every grid stays within
CUDA's limits and the backward's (heads, K, L) buffer of dz within the chunk budget.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from refattn import checks

from .. import kernels, memory
from ..device import compute_dtype, mirror, result_dtype

reference = importlib.import_module("refattn.fsat.sparse_attention")


class _Operands:
    """q, k, v (and dout) contiguous in their promoted dtype, the kernels' storage type; bias (and dlse) in
    the compute dtype; the mask as bytes."""

    def __init__(self, q: Any, k: Any, v: Any, offsets: Any, bias: Any, mask: Any, dout: Any = None):
        self.xp = xp = checks.array_namespace(q, k, v)
        self.dtype = result_dtype(q, k, v, dout)
        self.acc = compute_dtype(self.dtype)
        self.q, self.k, self.v, self.dout = (
            None if x is None else xp.ascontiguousarray(x.astype(self.dtype, copy=False)) for x in (q, k, v, dout))
        self.offsets, self.bias = xp.ascontiguousarray(offsets), self.computed(bias)
        self.mask = None if mask is None else xp.ascontiguousarray(mask).view(np.uint8)

    def computed(self, x: Any) -> Any:
        return None if x is None else self.xp.ascontiguousarray(x.astype(self.acc, copy=False))

    def groups(self, head_bytes: int = 0) -> list[tuple[slice, slice]]:
        batch, heads, length = self.q.shape[:3]
        return memory.groups(batch, heads, min(kernels.heads_per_launch(length), memory.per_chunk(head_bytes)))

    def launch(self, kernel: str, group: tuple[slice, slice], columns: int, arrays: tuple[Any, ...],
               flags: tuple[int, ...]) -> None:
        """``kernel`` on one group: q, k, v, offsets, bias, mask (1-element placeholders for the absent ones),
        then ``arrays``, the sizes, the flags has_bias, has_mask, then ``flags``, then the logit scale."""
        placeholder = self.xp.zeros(1, self.acc)
        bias = placeholder if self.bias is None else self.bias[group]
        mask = placeholder.view(np.uint8) if self.mask is None else self.mask[group[0]]
        batch_rows, heads, length, dim = self.q[group].shape
        count, dim_v = self.offsets.shape[2], self.v.shape[3]
        plan = kernels.row_launch(kernel, batch_rows * heads, length, columns,
                                  batch_rows * heads * length * max(dim, dim_v, count) - 1)
        sizes = (heads, length, dim, dim_v, count, -(-length // kernels.WARPS_PER_BLOCK))
        args = (self.q[group], self.k[group], self.v[group], self.offsets[group], bias, mask, *arrays,
                *map(np.int64, sizes), *map(np.int32, (self.bias is not None, self.mask is not None, *flags)),
                np.float64(1.0 / math.sqrt(dim)))
        kernels.launch(plan, self.dtype, args)


def forward(q: Any, k: Any, v: Any, offsets: Any, bias: Any, *, causal: bool, key_padding_mask: Any) -> tuple[Any, Any]:
    """(out in the inputs' dtype, lse in the compute dtype) of validated arguments."""
    x = _Operands(q, k, v, offsets, bias, key_padding_mask)
    out, lse = x.xp.empty(x.v.shape, x.dtype), x.xp.empty(x.q.shape[:3], x.acc)
    for group in x.groups():
        x.launch("fsat_sparse_forward", group, x.v.shape[3], (out[group], lse[group]), (causal,))
    return out, lse


def backward(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any, causal: bool,
             key_padding_mask: Any) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv in the inputs' dtype, dbias in the compute dtype or None) of validated arguments."""
    x = _Operands(q, k, v, offsets, bias, key_padding_mask, dout)
    xp, acc, dlse = x.xp, x.acc, x.computed(dlse)
    length, dim, count = x.q.shape[2], x.q.shape[3], x.offsets.shape[2]
    dq, dk, dv = xp.empty_like(x.q), xp.empty_like(x.k), xp.empty_like(x.v)
    dbias = xp.empty(x.offsets.shape, acc)
    for group in x.groups(memory.sparse_vjp_head(length, count, acc.itemsize)):
        rows = x.q[group].shape[:2]
        lse, delta, dz = xp.empty(rows + (length,), acc), xp.empty(rows + (length,), acc), xp.empty(
            rows + (count, length), acc)
        given = xp.zeros(1, acc) if dlse is None else dlse[group]
        x.launch("fsat_sparse_backward_query", group, dim, (x.dout[group], given, dq[group], lse, delta, dz),
                 (dlse is not None, causal))
        x.launch("fsat_sparse_backward_key", group, max(dim, x.v.shape[3]),
                 (x.dout[group], lse, delta, dk[group], dv[group]), (causal,))
        dbias[group] = dz.sum(axis=-1)
    return dq, dk, dv, None if bias is None else dbias


sparse_attention = mirror(reference.sparse_attention, forward, compute=False)

sparse_attention_vjp = mirror(reference.sparse_attention_vjp, backward, compute=False)
