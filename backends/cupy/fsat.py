"""FSAT on CuPy arrays (spec/fsat.md, spec/interface.md): the ``fsat`` namespace of the CuPy backend.

Mirrors the reference refattn.fsat step by step:

- ``pair_counts``, ``cross``, ``cross_vjp``: zero-padded real FFTs with ``cupy.fft`` (cuFFT), lengths
  with prime factors 2, 3, 5, 7 (:func:`._config.fft_length`);
- ``estimate``, ``estimate_vjp``: array expressions;
- ``select``: a stable ``argsort`` of the candidates listed in tie-break order (float64 scores);
- ``sparse_attention`` and its VJP: the fused kernels of kernels/fsat_sparse_attention.cu.

Outputs have the inputs' (promoted) floating dtype; float16 is computed in float32. Host-side code is
written against ``xp`` (CuPy, or NumPy inside :func:`refattn.backends.cupy.host_execution`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from refattn.checks import flag, integer_in_range, length_from_offsets, offsets_array
from refattn.fsat import FSATGrads
from refattn.fsat.select import candidate_order

from . import _array, _config, _kernels
from ._array import (
    expect_shape,
    float_array,
    padding_mask,
    sequence,
)

__all__ = [
    "FSATGrads",
    "attention",
    "attention_vjp",
    "cross",
    "cross_vjp",
    "estimate",
    "estimate_vjp",
    "pair_counts",
    "select",
    "sparse_attention",
    "sparse_attention_vjp",
]


def _convolve(xp: Any, x: Any, y: Any, axis: int, size: int) -> Any:
    """Linear convolution of x and y along ``axis``, first ``size`` entries, via zero-padded rFFTs."""
    n = _config.fft_length(x.shape[axis] + y.shape[axis] - 1)
    spectrum = xp.fft.rfft(x, n=n, axis=axis)
    spectrum *= xp.fft.rfft(y, n=n, axis=axis)
    full = xp.fft.irfft(spectrum, n=n, axis=axis)
    index = [slice(None)] * full.ndim
    index[axis] = slice(0, size)
    return full[tuple(index)]


def _counts(xp: Any, length: int, mask: Any) -> Any:
    """n_tau as float64 (B or 1, 2L - 1)."""
    tau = xp.arange(-(length - 1), length)
    if mask is None:
        return (length - xp.abs(tau))[None, :].astype(np.float64)
    valid = (~mask).astype(np.float64)
    return xp.rint(_convolve(xp, valid[:, ::-1], valid, axis=1, size=2 * length - 1))


def pair_counts(length: int, key_padding_mask: Any = None) -> Any:
    """Number of valid pairs n_tau per offset, int64 (B or 1, 2L - 1) (see refattn.fsat.pair_counts)."""
    length = integer_in_range(length, "length", low=1)
    xp, a = _array.arrays(key_padding_mask=key_padding_mask)
    mask = padding_mask(a["key_padding_mask"], None, length)
    return _counts(xp, length, mask).astype(np.int64)


def _inverse_counts(xp: Any, length: int, mask: Any, dtype: np.dtype) -> Any:
    counts = _counts(xp, length, mask)
    inverse = xp.where(counts > 0, 1.0 / xp.maximum(counts, 1.0), 0.0)
    return inverse[:, None, :, None].astype(dtype)


def _cross_inputs(xp, a, b, mask):
    sequence(xp, a, "a", "(B, H, L, Dc)")
    sequence(xp, b, "b", "(B, H, L, Dc)", tuple(a.shape[:3]), feature=a.shape[3])
    mask = padding_mask(mask, a.shape[0], a.shape[2])
    dtype = _array.result_dtype(a, b)
    a, b = _array.acc(a, dtype), _array.acc(b, dtype)
    if mask is not None:
        padded = mask[:, None, :, None]
        a = xp.where(padded, 0, a)
        b = xp.where(padded, 0, b)
    return a, b, mask, dtype


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> Any:
    """c (B, H, 2L - 1, Dc): the per-offset mean of a_i * b_{i+tau} (refattn.fsat.cross), with cuFFT."""
    xp, x = _array.arrays(a=a, b=b, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, x["a"]):
        a, b, mask, dtype = _cross_inputs(xp, x["a"], x["b"], x["key_padding_mask"])
        length = a.shape[2]
        numerator = _convolve(xp, a[:, :, ::-1], b, axis=2, size=2 * length - 1)
        return (numerator * _inverse_counts(xp, length, mask, numerator.dtype)).astype(dtype)


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(da, db) of :func:`cross` (refattn.fsat.cross_vjp): two convolutions of length 3L - 2."""
    xp, x = _array.arrays(a=a, b=b, dc=dc, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, x["a"]):
        a, b, mask, dtype = _cross_inputs(xp, x["a"], x["b"], x["key_padding_mask"])
        batch, heads, length, features = a.shape
        dc = sequence(xp, x["dc"], "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
        dtype = np.result_type(dtype, dc.dtype)
        g = _array.acc(dc, dtype) * _inverse_counts(xp, length, mask, _config.accumulation_dtype(dtype))
        da = _convolve(xp, b, g[:, :, ::-1], axis=2, size=2 * length - 1)[:, :, length - 1:]
        db = _convolve(xp, a, g, axis=2, size=2 * length - 1)[:, :, length - 1:]
        if mask is not None:
            padded = mask[:, None, :, None]
            da = xp.where(padded, 0, da)
            db = xp.where(padded, 0, db)
        return xp.ascontiguousarray(da.astype(dtype)), xp.ascontiguousarray(db.astype(dtype))


def _estimate_inputs(xp, c, w, mask):
    sequence(xp, c, "c", "(B, H, 2L - 1, Dc)")
    batch, heads, count, features = c.shape
    length = length_from_offsets(count, "c")
    float_array(xp, w, "w", rank=2, axes="(H, Dc)")
    expect_shape(w, "w", (heads, features), "(H, Dc)")
    mask = padding_mask(mask, batch, length)
    has_pairs = _counts(xp, length, mask)[:, None, :] > 0
    return has_pairs


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> Any:
    """s (B, H, 2L - 1) = <w_h, c_tau> / sqrt(Dc), -inf where n_tau = 0 (refattn.fsat.estimate)."""
    xp, x = _array.arrays(c=c, w=w, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, x["c"]):
        has_pairs = _estimate_inputs(xp, x["c"], x["w"], x["key_padding_mask"])
        dtype = _array.result_dtype(x["c"], x["w"])
        c, w = _array.acc(x["c"], dtype), _array.acc(x["w"], dtype)
        scores = xp.einsum("bhtd,hd->bht", c, w) / math.sqrt(c.shape[3])
        return xp.where(has_pairs, scores, -np.inf).astype(dtype)


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(dc, dw) of :func:`estimate`; ds at offsets with n_tau = 0 is ignored."""
    xp, x = _array.arrays(c=c, w=w, ds=ds, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, x["c"]):
        has_pairs = _estimate_inputs(xp, x["c"], x["w"], x["key_padding_mask"])
        float_array(xp, x["ds"], "ds", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(x["ds"], "ds", tuple(x["c"].shape[:3]), "(B, H, 2L - 1)")
        dtype = _array.result_dtype(x["c"], x["w"], x["ds"])
        c, w, ds = (_array.acc(x[name], dtype) for name in ("c", "w", "ds"))
        ds = xp.where(has_pairs, ds, 0) / math.sqrt(c.shape[3])
        dc = ds[..., None] * w[None, :, None, :]
        dw = xp.einsum("bht,bhtd->hd", ds, c)
        return dc.astype(dtype), dw.astype(dtype)


def _select(xp, s, top_k, causal, noise):
    """select on validated arrays: s (B, H, 2L - 1) with -inf allowed, noise finite or None."""
    length = (s.shape[2] + 1) // 2
    scores = s.astype(np.float64)
    if noise is not None:
        scores = scores + noise.astype(np.float64)
    candidates = candidate_order(length, causal=flag(causal, "causal"))
    k_eff = min(top_k, candidates.size + 1)
    zero = xp.zeros(tuple(s.shape[:2]) + (1,), dtype=np.int64)
    if k_eff == 1:
        return zero
    device_candidates = xp.asarray(candidates)
    ordered = scores[:, :, device_candidates + (length - 1)]
    # Descending score, equal scores in tie-break order (-(-inf) = +inf sorts last, stably).
    best = xp.argsort(-ordered, axis=-1, kind="stable")[:, :, : k_eff - 1]
    chosen = device_candidates[best]
    return xp.sort(xp.concatenate([zero, chosen], axis=-1), axis=-1).astype(np.int64)


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> Any:
    """offsets (B, H, K_eff) int64, ascending: 0 and the K - 1 best candidates of s + noise
    (ties: smaller |tau|, then negative), refattn.fsat.select."""
    xp, x = _array.arrays(s=s, noise=noise)
    with _array.device_of(xp, x["s"]):
        s = float_array(xp, x["s"], "s", rank=3, axes="(B, H, 2L - 1)", allow_neg_inf=True)
        length_from_offsets(s.shape[2], "s")
        top_k = integer_in_range(top_k, "top_k", low=1)
        noise = x["noise"]
        if noise is not None:
            float_array(xp, noise, "noise", rank=3, axes="(B, H, 2L - 1)")
            expect_shape(noise, "noise", tuple(s.shape), "(B, H, 2L - 1)")
        return _select(xp, s, top_k, causal, noise)


class _Sparse(NamedTuple):
    q: Any
    k: Any
    v: Any
    offsets: Any
    bias: Any  # accumulation dtype, or None
    mask: Any  # uint8 (B, L), or None
    dtype: np.dtype


def _sparse_inputs(xp, q, k, v, offsets, bias, mask) -> _Sparse:
    sequence(xp, q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    sequence(xp, k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    sequence(xp, v, "v", "(B, H, L, Dv)", (batch, heads, length))
    offsets = offsets_array(offsets, batch, heads, length)
    if bias is not None:
        float_array(xp, bias, "bias", rank=3, axes="(B, H, K)", allow_neg_inf=True)
        expect_shape(bias, "bias", tuple(offsets.shape), "(B, H, K)")
    mask = padding_mask(mask, batch, length)
    dtype = _array.result_dtype(q, k, v)
    q, k, v = (xp.ascontiguousarray(x.astype(dtype, copy=False)) for x in (q, k, v))
    if bias is not None:
        bias = xp.ascontiguousarray(_array.acc(bias, dtype))
    if mask is not None:
        mask = xp.ascontiguousarray(mask).view(np.uint8)
    return _Sparse(q, k, v, xp.ascontiguousarray(offsets), bias, mask, dtype)


def _optional(xp, array, dtype):
    """A kernel argument for an optional array: (the array or a 1-element placeholder, flag)."""
    if array is None:
        return xp.zeros(1, dtype=dtype), np.int32(0)
    return array, np.int32(1)


def _sparse_forward(xp, x: _Sparse, causal: bool) -> tuple[Any, Any]:
    """Launch the forward kernel; (out in x.dtype, lse in the accumulation dtype)."""
    batch, heads, length, dim = x.q.shape
    dim_v, count = x.v.shape[3], x.offsets.shape[2]
    acc = _config.accumulation_dtype(x.dtype)
    out = xp.empty((batch, heads, length, dim_v), dtype=x.dtype)
    lse = xp.empty((batch, heads, length), dtype=acc)
    plan = _config.row_launch(batch * heads, length, dim_v)
    bias, has_bias = _optional(xp, x.bias, acc)
    mask, has_mask = _optional(xp, x.mask, np.uint8)
    args = (x.q, x.k, x.v, x.offsets, bias, mask, out, lse, np.int64(heads), np.int64(length), np.int64(dim),
            np.int64(dim_v), np.int64(count), np.int64(plan.tiles), has_bias, has_mask,
            np.int32(flag(causal, "causal")), np.float64(1.0 / math.sqrt(dim)))
    _kernels.launch(xp, _config.FSAT_SPARSE, "fsat_sparse_forward", x.dtype, plan, args)
    return out, lse


def sparse_attention(q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *, causal: bool = False,
                     key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(out (B, H, L, Dv), lse (B, H, L)): attention on the selected diagonals with a per-offset bias
    (refattn.fsat.sparse_attention), one fused kernel with an online softmax over the K offsets."""
    xp, a = _array.arrays(q=q, k=k, v=v, offsets=offsets, bias=bias, key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        x = _sparse_inputs(xp, a["q"], a["k"], a["v"], a["offsets"], a["bias"], a["key_padding_mask"])
        out, lse = _sparse_forward(xp, x, causal)
        return out, lse.astype(x.dtype)


def _sparse_backward(xp, x: _Sparse, dout: Any, dlse: Any, causal: bool):
    batch, heads, length, dim = x.q.shape
    dim_v, count = x.v.shape[3], x.offsets.shape[2]
    acc = _config.accumulation_dtype(x.dtype)
    dq = xp.empty_like(x.q)
    dk = xp.empty_like(x.k)
    dv = xp.empty_like(x.v)
    lse = xp.empty((batch, heads, length), dtype=acc)
    delta = xp.empty((batch, heads, length), dtype=acc)
    dz = xp.empty((batch, heads, count, length), dtype=acc)
    bias, has_bias = _optional(xp, x.bias, acc)
    mask, has_mask = _optional(xp, x.mask, np.uint8)
    dlse, has_dlse = _optional(xp, None if dlse is None else xp.ascontiguousarray(dlse.astype(acc)), acc)
    scale = np.float64(1.0 / math.sqrt(dim))
    sizes = (np.int64(heads), np.int64(length), np.int64(dim), np.int64(dim_v), np.int64(count))
    plan = _config.row_launch(batch * heads, length, dim)
    _kernels.launch(xp, _config.FSAT_SPARSE, "fsat_sparse_backward_query", x.dtype, plan,
                    (x.q, x.k, x.v, x.offsets, bias, mask, dout, dlse, dq, lse, delta, dz, *sizes,
                     np.int64(plan.tiles), has_bias, has_mask, has_dlse, np.int32(flag(causal, "causal")), scale))
    plan = _config.row_launch(batch * heads, length, max(dim, dim_v))
    _kernels.launch(xp, _config.FSAT_SPARSE, "fsat_sparse_backward_key", x.dtype, plan,
                    (x.q, x.k, x.v, x.offsets, bias, mask, dout, lse, delta, dk, dv, *sizes,
                     np.int64(plan.tiles), has_bias, has_mask, np.int32(flag(causal, "causal")), scale))
    dbias = None if x.bias is None else dz.sum(axis=-1).astype(x.dtype)
    return dq, dk, dv, dbias


def sparse_attention_vjp(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any = None,
                         causal: bool = False, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) of :func:`sparse_attention` (refattn.fsat.sparse_attention_vjp): a query
    kernel (dq, dz) and a key kernel (dk, dv, gathered from i = j - tau, no atomics); dbias = sum_i dz."""
    xp, a = _array.arrays(q=q, k=k, v=v, offsets=offsets, bias=bias, dout=dout, dlse=dlse,
                          key_padding_mask=key_padding_mask)
    with _array.device_of(xp, a["q"]):
        x = _sparse_inputs(xp, a["q"], a["k"], a["v"], a["offsets"], a["bias"], a["key_padding_mask"])
        dout = sequence(xp, a["dout"], "dout", "(B, H, L, Dv)", tuple(x.q.shape[:3]), feature=x.v.shape[3])
        dout = xp.ascontiguousarray(dout.astype(x.dtype, copy=False))
        dlse = a["dlse"]
        if dlse is not None:
            float_array(xp, dlse, "dlse", rank=3, axes="(B, H, L)")
            expect_shape(dlse, "dlse", tuple(x.q.shape[:3]), "(B, H, L)")
        return _sparse_backward(xp, x, dout, dlse, causal)


class _Plan(NamedTuple):
    q: Any
    k: Any
    v: Any
    w: Any
    a: Any
    b: Any
    separate: bool
    mask: Any
    c: Any
    s: Any
    offsets: Any
    bias: Any


def _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k):
    """Validate every input, then run steps 1-2 (cross, estimate, select) on the inputs' device."""
    xp, x = _array.arrays(q=q, k=k, v=v, w=w, key_padding_mask=key_padding_mask, noise=noise, cross_q=cross_q,
                          cross_k=cross_k)
    with _array.device_of(xp, x["q"]):
        return xp, _plan_on_device(xp, x, top_k, causal)


def _plan_on_device(xp, x, top_k, causal):
    q = sequence(xp, x["q"], "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = sequence(xp, x["k"], "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(xp, x["v"], "v", "(B, H, L, Dv)", (batch, heads, length))
    cross_q, cross_k = x["cross_q"], x["cross_k"]
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    separate = cross_q is not None
    if separate:
        a = sequence(xp, cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        b = sequence(xp, cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=a.shape[3])
    else:
        a, b = q, k
    w = float_array(xp, x["w"], "w", rank=2, axes="(H, Dc)")
    expect_shape(w, "w", (heads, a.shape[3]), "(H, Dc)")
    top_k = integer_in_range(top_k, "top_k", low=1)
    mask = padding_mask(x["key_padding_mask"], batch, length)
    noise = x["noise"]
    if noise is not None:
        float_array(xp, noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(noise, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    c = cross(a, b, key_padding_mask=mask)
    s = estimate(c, w, key_padding_mask=mask)
    offsets = _select(xp, s, top_k, causal, noise)
    bias = xp.take_along_axis(s, offsets + (length - 1), axis=2)
    return _Plan(q, k, v, w, a, b, separate, mask, c, s, offsets, bias)


def attention(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None,
              noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> Any:
    """FSAT attention, out (B, H, L, Dv): cross -> estimate -> select -> sparse attention (refattn.fsat.attention)."""
    xp, plan = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    with _array.device_of(xp, plan.q):
        out, _ = sparse_attention(plan.q, plan.k, plan.v, plan.offsets, plan.bias, causal=causal,
                                  key_padding_mask=plan.mask)
        return out


def attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False,
                  key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                  cross_k: Any = None) -> FSATGrads:
    """Gradient of :func:`attention` with the truncation of spec/fsat.md step 4 (refattn.fsat.attention_vjp)."""
    xp, plan = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    with _array.device_of(xp, plan.q):
        dq, dk, dv, dbias = sparse_attention_vjp(plan.q, plan.k, plan.v, plan.offsets, plan.bias, dout,
                                                 causal=causal, key_padding_mask=plan.mask)
        batch, heads, length = plan.q.shape[:3]
        ds = xp.zeros(tuple(plan.s.shape), dtype=dbias.dtype)
        rows_b = xp.arange(batch)[:, None, None]
        rows_h = xp.arange(heads)[None, :, None]
        ds[rows_b, rows_h, plan.offsets + (length - 1)] = dbias
        dc, dw = estimate_vjp(plan.c, plan.w, ds, key_padding_mask=plan.mask)
        if not plan.separate:
            return FSATGrads(dq, dk, dv, dw, None, None)
        da, db = cross_vjp(plan.a, plan.b, dc, key_padding_mask=plan.mask)
        return FSATGrads(dq, dk, dv, dw, da, db)
