"""FSAT end to end on CuPy arrays: :mod:`refattn.fsat.attention`'s checks, then its ``plan_core`` (cross,
estimate, select) in the compute dtype on groups of heads, so that the (B, H, 2L - 1, Dc) cross and its FFT
buffers exist for one group at a time, then the fused sparse attention kernels. The gradient recomputes
each group's cross, which the forward did not keep, for the estimator's path.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from refattn import checks
from refattn.fsat.cross import cross_core, cross_vjp_core
from refattn.fsat.estimate import estimate_vjp_core
from refattn.fsat.sparse_attention import OVERFLOWS as SPARSE_OVERFLOWS

from .. import memory
from ..device import cast, compute_dtype, mirror, result_dtype
from .sparse_attention import backward, forward

reference = importlib.import_module("refattn.fsat.attention")
FSATGrads = reference.FSATGrads


def _groups(q: Any, w: Any, compute: np.dtype, *, gradient: bool, separate: bool) -> list[tuple[slice, slice]]:
    batch, heads, length, dim = q.shape
    head_bytes = memory.fsat_head(length, dim, w.shape[1], compute.itemsize, gradient=gradient, separate=separate)
    return memory.groups(batch, heads, memory.per_chunk(head_bytes))


def _plan(q: Any, k: Any, w: Any, top_k: int, causal: bool, mask: Any, noise: Any, cross_q: Any, cross_k: Any,
          gradient: bool) -> tuple[Any, Any]:
    """Steps 1-2 on every group of heads: (the offsets, their bias in the compute dtype)."""
    xp = checks.array_namespace(q)
    batch, heads, length = q.shape[:3]
    compute = compute_dtype(result_dtype(q, k, w))
    count = min(top_k, length if causal else 2 * length - 1)
    offsets, bias = xp.empty((batch, heads, count), np.int64), xp.empty((batch, heads, count), compute)
    for group in _groups(q, w, compute, gradient=gradient, separate=cross_q is not None):
        a, b, g, cq, ck = (cast(memory.part(x, group), compute) for x in (q, k, noise, cross_q, cross_k))
        plan = reference.plan_core(a, b, cast(w[group[1]], compute), top_k, causal=causal, noise=g, cross_q=cq,
                                   cross_k=ck, key_padding_mask=memory.part(mask, group, "b"))
        offsets[group], bias[group] = plan.offsets, plan.bias
    return offsets, bias


def _attention(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool, key_padding_mask: Any, noise: Any,
               cross_q: Any, cross_k: Any) -> Any:
    offsets, bias = _plan(q, k, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k, gradient=False)
    out, lse = forward(q, k, v, offsets, bias, causal=causal, key_padding_mask=key_padding_mask)
    checks.check_overflows((out, lse), SPARSE_OVERFLOWS["sparse_attention"], q=q, k=k)
    return out


def _attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool, key_padding_mask: Any,
                   noise: Any, cross_q: Any, cross_k: Any) -> Any:
    mask, separate = key_padding_mask, cross_q is not None
    offsets, bias = _plan(q, k, w, top_k, causal, mask, noise, cross_q, cross_k, gradient=True)
    dq, dk, dv, dbias = backward(q, k, v, offsets, bias, dout, dlse=None, causal=causal, key_padding_mask=mask)
    xp, compute, length = checks.array_namespace(q), bias.dtype, q.shape[2]
    dw = xp.zeros(w.shape, compute)
    da, db = (xp.empty(cross_q.shape, compute), xp.empty(cross_k.shape, compute)) if separate else (None, None)
    for group in _groups(q, w, compute, gradient=True, separate=separate):  # the estimator's path, cross recomputed
        part_mask = memory.part(mask, group, "b")
        a, b = (cast(memory.part(x, group), compute) for x in ((cross_q, cross_k) if separate else (q, k)))
        c = cross_core(a, b, key_padding_mask=part_mask)
        ds = xp.zeros(c.shape[:3], compute)
        xp.put_along_axis(ds, offsets[group] + (length - 1), dbias[group], axis=2)
        dc, dw_part = estimate_vjp_core(c, cast(w[group[1]], compute), ds, key_padding_mask=part_mask)
        dw[group[1]] += dw_part
        if separate:
            da[group], db[group] = cross_vjp_core(a, b, dc, key_padding_mask=part_mask)
    return FSATGrads(dq, dk, dv, dw, da, db)


attention = mirror(reference.attention, _attention, compute=False)

attention_vjp = mirror(reference.attention_vjp, _attention_vjp, compute=False)
