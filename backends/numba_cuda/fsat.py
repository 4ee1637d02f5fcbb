"""FSAT (spec/fsat.md) on Numba-CUDA kernels: the ``fsat`` namespace of spec/interface.md.

Every step runs on the device: pair counts, the cross module as FFT convolutions (an iterative
radix-2 Stockham FFT written in Numba-CUDA, N the power of two >= 2L - 1, two real sequences packed
in one complex transform), the estimate, the selection (rank by counting on the tie-rule key), and
the sparse attention (one block per (query tile, batch, head), online softmax over the K offsets)
with its backward kernels. The host validates metadata, launches and, for NumPy inputs, copies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refattn.checks import (
    expect_shape,
    flag,
    integer_in_range,
    length_from_offsets,
    offsets_array,
    padding_mask,
)
from refattn.fsat import FSATGrads

from . import _kernels
from ._runtime import (
    Call,
    Meta,
    float_array,
    host_small,
    is_device,
    launch,
    pow2_at_least,
    score_array,
    sequence,
    twiddles,
)

__all__ = ["pair_counts", "cross", "cross_vjp", "estimate", "estimate_vjp", "select", "sparse_attention",
           "sparse_attention_vjp", "attention", "attention_vjp", "FSATGrads"]

_AXES = "(B, H, L, Dc)"


# ---------------------------------------------------------------- helpers


def _mask_any_batch(key_padding_mask: Any, length: int) -> np.ndarray:
    mask = host_small(key_padding_mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"key_padding_mask: expected a bool array (True = padding), got dtype {mask.dtype}")
    if mask.ndim != 2 or mask.shape[1] != length or mask.shape[0] < 1:
        raise ValueError(f"key_padding_mask: expected shape (B, L) with L = {length}, got {mask.shape}")
    return mask


def _valid(call: Call, mask: np.ndarray | None, length: int) -> Any:
    """The validity indicator (B or 1, L) in the compute dtype, on the device."""
    valid = np.ones((1, length)) if mask is None else (~mask).astype(np.float64)
    return call.put(valid)


def _counts(call: Call, valid: Any, length: int) -> Any:
    counts = call.empty((valid.shape[0], 2 * length - 1), np.int64)
    launch(call.kernels["pair_counts_k"], counts.size, valid, counts)
    return counts


def _inverse(call: Call, counts: Any) -> Any:
    inverse = call.empty(counts.shape)
    launch(call.kernels["inverse_counts_k"], counts.size, counts, inverse)
    return inverse


def _convolve(call: Call, x: Any, mx: Any, rev_x: bool, y: Any, my: Any, rev_y: bool, offset: int, scale: Any,
              out: Any) -> None:
    """out[b, h, t, f] = scale[., t] * (x' * y')[t + offset], x' = x * mx (reversed if rev_x), y' likewise.

    Full linear convolution along the sequence axis by one complex FFT of x' + i y' (length N, the
    power of two >= len_x + len_y - 1), the spectral product, and one inverse FFT.
    """
    kernels = call.kernels
    batch, heads, len_x, features = x.shape
    size = pow2_at_least(len_x + y.shape[2] - 1)
    rows = batch * heads * features
    ar, ai = call.empty((rows, size)), call.empty((rows, size))
    br, bi = call.empty((rows, size)), call.empty((rows, size))
    launch(kernels["pack_k"], rows * size, x, mx, int(rev_x), y, my, int(rev_y), ar, ai)
    wr, wi = twiddles(size, call.dtype)

    def transform(src_r, src_i, dst_r, dst_i, sign):
        stride = 1
        while stride < size:
            launch(kernels["fft_stage_k"], rows * (size // 2), src_r, src_i, dst_r, dst_i, wr, wi, stride,
                   call.scalar(sign))
            src_r, src_i, dst_r, dst_i = dst_r, dst_i, src_r, src_i
            stride *= 2
        return src_r, src_i, dst_r, dst_i

    zr, zi, fr, fi = transform(ar, ai, br, bi, 1.0)
    launch(kernels["spectral_product_k"], rows * size, zr, zi, fr, fi)
    rr, _, _, _ = transform(fr, fi, zr, zi, -1.0)
    launch(kernels["unpack_k"], out.size, rr, offset, call.scalar(1.0 / size), scale, out)


# ---------------------------------------------------------------- step 1: cross


def pair_counts(length: int, key_padding_mask: Any = None) -> Any:
    """n_tau per diagonal, (1 or B, 2L - 1) int64, counted on the device (one thread per (b, tau))."""
    length = integer_in_range(length, "length", low=1)
    mask = None if key_padding_mask is None else _mask_any_batch(key_padding_mask, length)
    call = Call(key_padding_mask)  # no float input: float64 kernels; results follow the mask's kind
    counts = _counts(call, _valid(call, mask, length), length)
    return call.out(counts)


def _cross_inputs(a: Any, b: Any, key_padding_mask: Any):
    ma = sequence(a, "a", _AXES)
    sequence(b, "b", _AXES, ma.shape[:3], feature=ma.shape[3])
    mask = padding_mask(host_small(key_padding_mask), ma.shape[0], ma.shape[2])
    return ma, mask


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> Any:
    """c (B, H, 2L - 1, Dc): the per-offset mean of a_i * b_{i + tau} over valid pairs (FFT on the device)."""
    meta, mask = _cross_inputs(a, b, key_padding_mask)
    call = Call(a, b)
    return call.out(_cross(call, call.put(a), call.put(b), mask))


def _cross(call: Call, a: Any, b: Any, mask: np.ndarray | None) -> Any:
    batch, heads, length, features = a.shape
    valid = _valid(call, mask, length)
    inverse = _inverse(call, _counts(call, valid, length))
    c = call.empty((batch, heads, 2 * length - 1, features))
    _convolve(call, a, valid, True, b, valid, False, 0, inverse, c)
    return c


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(da, db) of :func:`cross`: two FFT convolutions of length >= 3L - 2, middle L entries kept."""
    meta, mask = _cross_inputs(a, b, key_padding_mask)
    batch, heads, length, features = meta.shape
    sequence(dc, "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
    call = Call(a, b, dc)
    da, db = _cross_vjp(call, call.put(a), call.put(b), call.put(dc), mask)
    return call.out(da), call.out(db)


def _cross_vjp(call: Call, a: Any, b: Any, dc: Any, mask: np.ndarray | None) -> tuple[Any, Any]:
    batch, heads, length, features = a.shape
    valid = _valid(call, mask, length)
    inverse = _inverse(call, _counts(call, valid, length))
    da = call.empty(a.shape)
    db = call.empty(a.shape)
    # da = (b * rev(g))[L-1 : 2L-1], db = (a * g)[L-1 : 2L-1], g = dc / n (0 where n = 0)
    _convolve(call, b, valid, False, dc, inverse, True, length - 1, valid, da)
    _convolve(call, a, valid, False, dc, inverse, False, length - 1, valid, db)
    return da, db


# ---------------------------------------------------------------- step 2: estimate, select


def _estimate_inputs(c: Any, w: Any, key_padding_mask: Any):
    meta = sequence(c, "c", "(B, H, 2L - 1, Dc)")
    batch, heads, count, features = meta.shape
    length = length_from_offsets(count, "c")
    wm = float_array(w, "w", rank=2, axes="(H, Dc)")
    expect_shape(wm, "w", (heads, features), "(H, Dc)")
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    return meta, length, mask


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> Any:
    """s (B, H, 2L - 1) = <w_h, c_tau> / sqrt(Dc), -inf where n_tau = 0; one thread per (b, h, tau)."""
    meta, length, mask = _estimate_inputs(c, w, key_padding_mask)
    call = Call(c, w)
    return call.out(_estimate(call, call.put(c), call.put(w), mask, length))


def _estimate(call: Call, c: Any, w: Any, mask: np.ndarray | None, length: int) -> Any:
    counts = _counts(call, _valid(call, mask, length), length)
    s = call.empty(c.shape[:3])
    launch(call.kernels["estimate_k"], s.size, c, w, counts, call.scalar(1.0 / math.sqrt(c.shape[3])), s)
    return s


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(dc, dw) of :func:`estimate`; ds at offsets with n_tau = 0 is ignored."""
    meta, length, mask = _estimate_inputs(c, w, key_padding_mask)
    dsm = float_array(ds, "ds", rank=3, axes="(B, H, 2L - 1)")
    expect_shape(dsm, "ds", meta.shape[:3], "(B, H, 2L - 1)")
    call = Call(c, w, ds)
    dc, dw = _estimate_vjp(call, call.put(c), call.put(w), call.put(ds), mask, length)
    return call.out(dc), call.out(dw)


def _estimate_vjp(call: Call, c: Any, w: Any, ds: Any, mask: np.ndarray | None, length: int) -> tuple[Any, Any]:
    counts = _counts(call, _valid(call, mask, length), length)
    rscale = call.scalar(1.0 / math.sqrt(c.shape[3]))
    dc = call.empty(c.shape)
    dw = call.empty(w.shape)
    launch(call.kernels["estimate_vjp_dc_k"], dc.size, ds, w, counts, rscale, dc)
    launch(call.kernels["estimate_vjp_dw_k"], dw.size, ds, c, counts, rscale, dw)
    return dc, dw


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> Any:
    """offsets (B, H, K_eff) int64, ascending: tau = 0 and the K - 1 best candidates by the tie rule."""
    meta = score_array(s, "s", rank=3, axes="(B, H, 2L - 1)")
    length_from_offsets(meta.shape[2], "s")  # validates the offset axis
    top_k = integer_in_range(top_k, "top_k", low=1)
    if noise is not None:
        nm = float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(nm, "noise", meta.shape, "(B, H, 2L - 1)")
    call = Call(s, noise)
    return call.out(_select(call, call.put(s), top_k, flag(causal, "causal"), call.put(noise)))


def _select(call: Call, s: Any, top_k: int, causal: bool, noise: Any) -> Any:
    batch, heads, count = s.shape
    length = (count + 1) // 2
    candidates = (length - 1) if causal else (2 * length - 2)
    k_eff = min(top_k, candidates + 1)
    chosen = call.empty(s.shape, np.int64)
    dummy = noise if noise is not None else s
    launch(call.kernels["select_rank_k"], s.size, s, dummy, int(noise is not None), int(causal), k_eff - 1, chosen)
    offsets = call.empty((batch, heads, k_eff), np.int64)
    launch(call.kernels["select_place_k"], s.size, chosen, offsets)
    return offsets


# ---------------------------------------------------------------- step 3: sparse attention


def _sparse_inputs(q, k, v, offsets, bias, key_padding_mask):
    mq = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = mq.shape
    sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    mv = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    host_offsets = offsets_array(host_small(offsets), batch, heads, length)
    if bias is not None:
        bm = score_array(bias, "bias", rank=3, axes="(B, H, K)")
        expect_shape(bm, "bias", host_offsets.shape, "(B, H, K)")
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    return mq, mv, host_offsets, mask


def _device_offsets(call: Call, offsets: Any, host_offsets: np.ndarray) -> Any:
    from ._runtime import device_view
    if is_device(offsets) and np.dtype(device_view(offsets).dtype) == np.int64:
        return device_view(offsets)
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(host_offsets, dtype=np.int64))


def _tile(length: int) -> int:
    return min(_kernels.TILE, length)


def _sparse_forward(call: Call, q, k, v, offsets, bias, causal, valid):
    batch, heads, length, dim = q.shape
    out = call.empty(v.shape)
    lse = call.empty(q.shape[:3])
    width = _tile(length)
    grid = ((length + width - 1) // width, batch * heads)
    dummy = bias if bias is not None else lse
    call.kernels["sparse_fwd_k"][grid, width](q, k, v, offsets, dummy, int(bias is not None), int(causal), valid,
                                              call.scalar(1.0 / math.sqrt(dim)), out, lse)
    return out, lse


def sparse_attention(q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *, causal: bool = False,
                     key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(out (B, H, L, Dv), lse (B, H, L)): attention on the selected diagonals, bias added per offset."""
    mq, mv, host_offsets, mask = _sparse_inputs(q, k, v, offsets, bias, key_padding_mask)
    call = Call(q, k, v, bias)
    out, lse = _sparse_forward(call, call.put(q), call.put(k), call.put(v),
                               _device_offsets(call, offsets, host_offsets), call.put(bias), flag(causal, "causal"),
                               _valid(call, mask, mq.shape[2]))
    return call.out(out), call.out(lse)


def _sparse_backward(call: Call, q, k, v, offsets, bias, dout, dlse, causal, valid):
    batch, heads, length, dim = q.shape
    top = offsets.shape[2]
    out, lse = _sparse_forward(call, q, k, v, offsets, bias, causal, valid)
    probs = call.empty((batch, heads, length, top))
    dz = call.empty((batch, heads, length, top))
    dq = call.empty(q.shape)
    width = _tile(length)
    grid = ((length + width - 1) // width, batch * heads)
    scale = call.scalar(1.0 / math.sqrt(dim))
    call.kernels["sparse_bwd_q_k"][grid, width](
        q, k, v, offsets, bias if bias is not None else lse, int(bias is not None), int(causal), valid, scale, out, lse,
        dout, dlse if dlse is not None else lse, int(dlse is not None), probs, dz, dq)
    dk = call.empty(k.shape)
    dv = call.empty(v.shape)
    call.kernels["sparse_bwd_kv_k"][grid, width](q, dout, offsets, probs, dz, scale, dk, dv)
    dbias = None
    if bias is not None:
        dbias = call.empty((batch, heads, top))
        threads = min(_kernels.REDUCE, pow2_at_least(length))
        call.kernels["sum_over_length_k"][(batch * heads, top), threads](dz, dbias)
    return dq, dk, dv, dbias


def sparse_attention_vjp(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any = None,
                         causal: bool = False, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) of :func:`sparse_attention`; dbias is None when bias is None."""
    mq, mv, host_offsets, mask = _sparse_inputs(q, k, v, offsets, bias, key_padding_mask)
    sequence(dout, "dout", "(B, H, L, Dv)", mq.shape[:3], feature=mv.shape[3])
    if dlse is not None:
        ml = float_array(dlse, "dlse", rank=3, axes="(B, H, L)")
        expect_shape(ml, "dlse", mq.shape[:3], "(B, H, L)")
    call = Call(q, k, v, bias, dout, dlse)
    grads = _sparse_backward(call, call.put(q), call.put(k), call.put(v), _device_offsets(call, offsets, host_offsets),
                             call.put(bias), call.put(dout), call.put(dlse), flag(causal, "causal"),
                             _valid(call, mask, mq.shape[2]))
    return tuple(call.out(g) for g in grads)


# ---------------------------------------------------------------- the pipeline


def _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k):
    mq = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = mq.shape
    sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    if (cross_q is None) != (cross_k is None):
        missing = "cross_k" if cross_k is None else "cross_q"
        raise ValueError(f"{missing}: cross_q and cross_k must be given together (both or neither), got only one")
    separate = cross_q is not None
    features = dim
    if separate:
        ma = sequence(cross_q, "cross_q", "(B, H, L, Dc)", (batch, heads, length))
        sequence(cross_k, "cross_k", "(B, H, L, Dc)", (batch, heads, length), feature=ma.shape[3])
        features = ma.shape[3]
    wm = float_array(w, "w", rank=2, axes="(H, Dc)")
    expect_shape(wm, "w", (heads, features), "(H, Dc)")
    top_k = integer_in_range(top_k, "top_k", low=1)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    if noise is not None:
        nm = float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(nm, "noise", (batch, heads, 2 * length - 1), "(B, H, 2L - 1)")
    return top_k, mask, separate, length


def _run_plan(q, k, v, w, top_k, causal, noise, cross_q, cross_k, mask, separate, length, extra=()):
    call = Call(q, k, v, w, noise, cross_q, cross_k, *extra)
    dq, dk, dv, dw = (call.put(x) for x in (q, k, v, w))
    a, b = (call.put(cross_q), call.put(cross_k)) if separate else (dq, dk)
    c = _cross(call, a, b, mask)
    s = _estimate(call, c, dw, mask, length)
    offsets = _select(call, s, top_k, flag(causal, "causal"), call.put(noise))
    bias = call.empty(offsets.shape)
    launch(call.kernels["gather_bias_k"], bias.size, s, offsets, bias)
    valid = _valid(call, mask, length)
    return call, dict(q=dq, k=dk, v=dv, w=dw, a=a, b=b, separate=separate, mask=mask, c=c, s=s, offsets=offsets,
                      bias=bias, valid=valid, length=length)


def attention(q: Any, k: Any, v: Any, w: Any, top_k: int, *, causal: bool = False, key_padding_mask: Any = None,
              noise: Any = None, cross_q: Any = None, cross_k: Any = None) -> Any:
    """FSAT attention: cross -> estimate -> select -> sparse attention, all on the device."""
    top_k, mask, separate, length = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    call, p = _run_plan(q, k, v, w, top_k, causal, noise, cross_q, cross_k, mask, separate, length)
    out, _ = _sparse_forward(call, p["q"], p["k"], p["v"], p["offsets"], p["bias"], flag(causal, "causal"), p["valid"])
    return call.out(out)


def attention_vjp(q: Any, k: Any, v: Any, w: Any, top_k: int, dout: Any, *, causal: bool = False,
                  key_padding_mask: Any = None, noise: Any = None, cross_q: Any = None,
                  cross_k: Any = None) -> FSATGrads:
    """FSATGrads of :func:`attention` with the truncation of spec/fsat.md step 4."""
    top_k, mask, separate, length = _plan(q, k, v, w, top_k, causal, key_padding_mask, noise, cross_q, cross_k)
    sequence(dout, "dout", "(B, H, L, Dv)", Meta(q).shape[:3], feature=Meta(v).shape[3])
    call, p = _run_plan(q, k, v, w, top_k, causal, noise, cross_q, cross_k, mask, separate, length, (dout,))
    dq, dk, dv, dbias = _sparse_backward(call, p["q"], p["k"], p["v"], p["offsets"], p["bias"], call.put(dout), None,
                                         flag(causal, "causal"), p["valid"])
    ds = call.zeros(p["s"].shape)
    launch(call.kernels["scatter_ds_k"], dbias.size, dbias, p["offsets"], ds)
    dc, dw = _estimate_vjp(call, p["c"], p["w"], ds, p["mask"], p["length"])
    da = db = None
    if p["separate"]:
        da, db = _cross_vjp(call, p["a"], p["b"], dc, p["mask"])
    return FSATGrads(*(call.out(x) for x in (dq, dk, dv, dw, da, db)))
