"""FSAT end to end on the device (:mod:`refattn.fsat.attention`, whose checks it runs).

How it differs from the reference: the steps' device cores are chained on device arrays, with the
pair counts computed once per call; the gradient's estimator path computes dc only when cross
inputs are given (nothing else reads it); the overflow checks of the intermediate results are
counted on the device and read once, at the end of the call.
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from refattn.fsat.attention import OVERFLOWS, FSATGrads, Plan, check_attention, check_attention_vjp
from refattn.fsat.sparse_attention import OVERFLOWS as SPARSE_OVERFLOWS

from ..device import unravel3
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .cross import Pairs, cross_core, cross_vjp_core, pairs
from .estimate import estimate_core, estimate_vjp_core
from .select import select_core
from .sparse_attention import sparse_backward, sparse_forward

__all__ = ["FSATGrads", "attention", "attention_vjp", "attention_core", "attention_vjp_core", "plan_core"]


def plan_core(call: Call, q: Any, k: Any, w: Any, top_k: int, pairs: Pairs, *, causal: bool = False,
              noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> Plan:
    """Steps 1-2 on the device: the cross, the estimate, the offsets and their bias."""
    a, b = (q, k) if cross_q is None else (cross_q, cross_k)
    names = dict(zip(("q", "k") if cross_q is None else ("cross_q", "cross_k"), (a, b), strict=True))
    c = cross_core(call, a, b, pairs)
    call.watch(c, "the cross", **names)
    s = estimate_core(call, c, w, pairs.counts)
    call.watch(s, "the estimate", allow_neg_inf=True, **names, w=w)
    offsets = select_core(call, s, top_k, causal=causal, noise=noise)
    bias = call.empty(offsets.shape)
    call.flat("gather_bias_k", bias.size, s, offsets, bias)
    return Plan(c, s, offsets, bias)


def attention_core(call: Call, q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False,
                   key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> Any:
    """out (B, H, L, Dv) on the device."""
    counts = pairs(call, q.shape[2], key_padding_mask)
    plan = plan_core(call, q, k, w, top_k, counts, causal=causal, noise=noise, cross_q=cross_q, cross_k=cross_k)
    offsets, bias = plan.offsets, plan.bias
    del plan  # frees the (B, H, 2L - 1, Dc) cross before the attention runs
    out, lse = sparse_forward(call, q, k, v, offsets, bias, causal, counts.valid)
    call.watch_rules((out, lse), SPARSE_OVERFLOWS["sparse_attention"], q=q, k=k)
    return out


def attention(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None,
              noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> Any:
    """:func:`refattn.fsat.attention` on the device."""
    call, (q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k) = intake(
        check_attention, q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    return call.out(attention_core(call, q, k, v, w, top_k, causal=causal, key_padding_mask=key_padding_mask,
                                   noise=noise, cross_q=cross_q, cross_k=cross_k))


def attention_vjp_core(call: Call, q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False,
                       key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                       cross_k: Any = None) -> FSATGrads:
    """:class:`FSATGrads` of device arrays, with the truncation of spec/fsat.md step 4."""
    counts = pairs(call, q.shape[2], key_padding_mask)
    plan = plan_core(call, q, k, w, top_k, counts, causal=causal, noise=noise, cross_q=cross_q, cross_k=cross_k)
    dq, dk, dv, dbias = sparse_backward(call, q, k, v, plan.offsets, plan.bias, dout, None, causal, counts.valid)
    ds = call.zeros(plan.s.shape)
    call.flat("scatter_ds_k", dbias.size, dbias, plan.offsets, ds)
    dc, dw = estimate_vjp_core(call, plan.c, w, ds, counts.counts, with_dc=cross_q is not None)
    rules = OVERFLOWS["attention_vjp"]  # dq, dk, dv, dw now; dcross_q, dcross_k once computed
    call.watch_rules((dq, dk, dv, dw), rules[:4], q=q, k=k, v=v, dout=dout)
    if cross_q is None:
        return FSATGrads(dq, dk, dv, dw, None, None)
    del plan
    da, db = cross_vjp_core(call, cross_q, cross_k, dc, counts)
    call.watch_rules((da, db), rules[4:], v=v, w=w, dout=dout, cross_q=cross_q, cross_k=cross_k)
    return FSATGrads(dq, dk, dv, dw, da, db)


def attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False,
                  key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                  cross_k: Any = None) -> FSATGrads:
    """:func:`refattn.fsat.attention_vjp` on the device."""
    call, (q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k) = intake(
        check_attention_vjp, q, k, v, w, top_k, dout, causal, key_padding_mask, noise, cross_q, cross_k)
    grads = attention_vjp_core(call, q, k, v, w, top_k, dout, causal=causal, key_padding_mask=key_padding_mask,
                               noise=noise, cross_q=cross_q, cross_k=cross_k)
    return FSATGrads(*call.out(*grads))


def kernels(dt: Any) -> KernelTable:
    """The kernels between the steps: the bias of the selected offsets and its gradient's scatter."""
    table, kernel = registry()

    @kernel("F3 I3 F3")
    def gather_bias_k(s, offsets, bias):
        """bias[b, h, m] = s[b, h, offsets[b, h, m] + L - 1]."""
        idx = cuda.grid(1)
        if idx < offsets.size:
            b, h, m = unravel3(idx, offsets.shape[1], offsets.shape[2])
            bias[b, h, m] = s[b, h, offsets[b, h, m] + (s.shape[2] - 1) // 2]

    @kernel("F3 I3 F3")
    def scatter_ds_k(dbias, offsets, ds):
        """ds[b, h, offsets[b, h, m] + L - 1] = dbias[b, h, m] (ds zero elsewhere)."""
        idx = cuda.grid(1)
        if idx < offsets.size:
            b, h, m = unravel3(idx, offsets.shape[1], offsets.shape[2])
            ds[b, h, offsets[b, h, m] + (ds.shape[2] - 1) // 2] = dbias[b, h, m]

    return table
