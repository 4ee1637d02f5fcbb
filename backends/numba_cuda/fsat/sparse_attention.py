"""FSAT step 3 on the device (:mod:`refattn.fsat.sparse_attention`, whose checks it runs).

How it differs from the reference: fused kernels instead of an (L, K) logit array, tiled for a GPU.

- A block owns a tile of ``rows`` consecutive queries (or, for dk and dv, keys) with ``lanes``
  threads per row on interleaved features. For offset tau the partners of the tile are the
  contiguous rows i0 + tau .. of k and v (i0 - tau .. of q and dout for the keys), so every operand
  is staged in shared memory feature-chunk by feature-chunk by coalesced loads (``stage_rows``);
  the rows' dot products are lane sums and a tree over the lanes.
- The output (dq, dk, dv) of the tile lives in shared memory, in blocks of up to ``RES`` columns,
  for the whole loop over the offsets (the online softmax rescales it there) and goes to device
  memory once, by coalesced stores: no read-modify-write of a global row per offset.
- Row strides of the tiles are padded (:func:`device.padded_stride`): conflict-free for any lanes.
- Backward: one kernel per query tile (p and dz of every offset, written for the key side, and dq),
  one per key tile (dk, dv: a gather, each key having one query per offset), and a column sum over
  the sequence for dbias: deterministic, no atomics.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from refattn.fsat.sparse_attention import OVERFLOWS, check_sparse_attention, check_sparse_attention_vjp

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .cross import valid_rows

__all__ = ["sparse_attention", "sparse_attention_vjp", "sparse_attention_core", "sparse_attention_vjp_core",
           "tile_launch"]

CHUNK = 64  # features staged per load
RES = 128  # output columns a tile holds in shared memory at once
LANES = 8  # the most lanes per row
LANE_FEATURES = 8  # features a lane adds on its own before the tree (fewer lanes for small D)


def tile_rows(itemsize: int) -> int:
    """Rows (queries or keys) per block: 32 in float32, 16 in float64 (the tiles stay under 48 KiB)."""
    return 32 if itemsize == 4 else 16


def tile_launch(batch_heads: int, length: int, features: int, itemsize: int) -> tuple[int, tuple[int, int]]:
    """(blocks, (lanes, rows)) of the attention kernels: one block per (b * H + h, tile of rows)."""
    rows = min(tile_rows(itemsize), length)
    lanes = min(LANES, 1 << max(0, math.ceil(math.log2(-(-features // LANE_FEATURES)))))
    return batch_heads * -(-length // rows), (lanes, rows)


def _tile_traffic(q: Any, v: Any, top: int, loads_qk: int, loads_v: int) -> int:
    """Bytes a tiled kernel moves: per offset ``loads_qk`` tiles of D features and ``loads_v`` of Dv (each
    a row of its operand per row of the tile), and the tile's own rows once (in and out)."""
    batch, heads, length, dim = q.shape
    rows = batch * heads * length * q.dtype.itemsize
    return rows * (top * (loads_qk * dim + loads_v * v.shape[3]) + 2 * (dim + v.shape[3]))


def sparse_forward(call: Call, q: Any, k: Any, v: Any, offsets: Any, bias: Any, causal: bool, valid: Any
                   ) -> tuple[Any, Any]:
    """(out, lse) of device arrays; ``valid`` (B or 1, L) in the compute dtype."""
    batch, heads, length, dim = q.shape
    out = call.empty(v.shape)
    lse = call.empty(q.shape[:3])
    blocks, block = tile_launch(batch * heads, length, max(dim, v.shape[3]), q.dtype.itemsize)
    top = offsets.shape[2]
    call.launch("sparse_forward_k", blocks, block, q, k, v, offsets, lse if bias is None else bias,
                int(bias is not None), int(causal), valid, call.scalar(1.0 / math.sqrt(dim)), out, lse,
                bytes_moved=_tile_traffic(q, v, top, 2 * -(-v.shape[3] // RES), 1))
    return out, lse


def sparse_attention_core(call: Call, q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *,
                          causal: bool = False, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """(out, lse) on the device."""
    return sparse_forward(call, q, k, v, offsets, bias, causal, valid_rows(call, key_padding_mask, q.shape[2]))


def sparse_attention(q: Any, k: Any, v: Any, offsets: Any, bias: Any = None, *, causal: bool = False,
                     key_padding_mask: Any = None) -> tuple[Any, Any]:
    """:func:`refattn.fsat.sparse_attention` on the device."""
    call, (q, k, v, offsets, bias, causal, key_padding_mask) = intake(
        check_sparse_attention, q, k, v, offsets, bias, causal, key_padding_mask)
    out, lse = sparse_attention_core(call, q, k, v, offsets, bias, causal=causal, key_padding_mask=key_padding_mask)
    call.watch_rules((out, lse), OVERFLOWS["sparse_attention"], q=q, k=k)
    return call.out(out, lse)


def sparse_backward(call: Call, q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, dlse: Any,
                    causal: bool, valid: Any) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias or None) of device arrays."""
    batch, heads, length, dim = q.shape
    top = offsets.shape[2]
    out, lse = sparse_forward(call, q, k, v, offsets, bias, causal, valid)
    probs = call.empty((batch, heads, length, top))
    dz = call.empty((batch, heads, length, top))
    dq = call.empty(q.shape)
    blocks, block = tile_launch(batch * heads, length, max(dim, v.shape[3]), q.dtype.itemsize)
    scale = call.scalar(1.0 / math.sqrt(dim))
    call.launch("sparse_backward_query_k", blocks, block, q, k, v, offsets, lse if bias is None else bias,
                int(bias is not None), int(causal), valid, scale, out, lse, dout, lse if dlse is None else dlse,
                int(dlse is not None), probs, dz, dq,
                bytes_moved=_tile_traffic(q, v, top, 3, 2) + 2 * probs.size * probs.dtype.itemsize)
    dk = call.empty(k.shape)
    dv = call.empty(v.shape)
    call.launch("sparse_backward_key_k", blocks, block, q, dout, offsets, probs, dz, scale, dk, dv,
                bytes_moved=_tile_traffic(q, v, top, 1, 1) + 2 * probs.size * probs.dtype.itemsize)
    dbias = None
    if bias is not None:
        dbias = call.empty((batch, heads, top))
        lanes = min(32, 1 << max(0, math.ceil(math.log2(top))))
        rows = min(SUM_BLOCK // lanes, 1 << max(0, math.ceil(math.log2(length))))
        call.launch("sum_over_length_k", batch * heads * -(-top // lanes), (lanes, rows), dz, dbias)
    return dq, dk, dv, dbias


SUM_BLOCK = 256  # the largest block of sum_over_length_k


def sparse_attention_vjp_core(call: Call, q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *,
                              dlse: Any = None, causal: bool = False, key_padding_mask: Any = None
                              ) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) on the device."""
    return sparse_backward(call, q, k, v, offsets, bias, dout, dlse, causal,
                           valid_rows(call, key_padding_mask, q.shape[2]))


def sparse_attention_vjp(q: Any, k: Any, v: Any, offsets: Any, bias: Any, dout: Any, *, dlse: Any = None,
                         causal: bool = False, key_padding_mask: Any = None) -> tuple[Any, Any, Any, Any]:
    """:func:`refattn.fsat.sparse_attention_vjp` on the device."""
    call, (q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask) = intake(
        check_sparse_attention_vjp, q, k, v, offsets, bias, dout, dlse, causal, key_padding_mask)
    dq, dk, dv, dbias = sparse_attention_vjp_core(call, q, k, v, offsets, bias, dout, dlse=dlse, causal=causal,
                                                  key_padding_mask=key_padding_mask)
    call.watch_rules((dq, dk, dv, dbias), OVERFLOWS["sparse_attention_vjp"], q=q, k=k, v=v, dout=dout)
    return call.out(dq, dk, dv, dbias)


def kernels(dt: Any) -> KernelTable:
    """The sparse-attention kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    size = dt.bitwidth // 8
    ROWS = tile_rows(size)
    STAGE = ROWS * (CHUNK + LANES)  # a staged tile at the widest padded stride
    ACC = ROWS * (RES + LANES)  # the output block
    REDUCE = ROWS * LANES  # the lanes' partial sums
    SHARED = (2 * STAGE + ACC + REDUCE + ROWS) * size
    KEY_SHARED = (STAGE + ACC + ROWS) * size
    fn = device.functions(dt)
    stage_rows, lane_dot, lane_axpy = fn.stage_rows, fn.lane_dot, fn.lane_axpy
    tree_sum = fn.tree_sum
    rescale, padded_stride = fn.rescale, fn.padded_stride
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def tile_of(length, heads):
        """(b, h, first row, staged-tile stride, output-block stride) of this block: blocks run over
        (b * H + h, tile of blockDim.y rows), blockDim.x lanes per row."""
        tiles = (length + cuda.blockDim.y - 1) // cuda.blockDim.y
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        lanes = cuda.blockDim.x
        return (b, bh - b * heads, (cuda.blockIdx.x - bh * tiles) * cuda.blockDim.y, padded_stride(CHUNK, lanes),
                padded_stride(RES, lanes))

    @cuda.jit(device=True, inline=True)
    def query_tiles():
        """The shared arrays of a query-tile kernel: two staged tiles, the output block, the lanes' partial
        sums and a per-row scale. (One array per line: the CUDA simulator tells them apart by their line.)"""
        first = cuda.shared.array(STAGE, dt)
        second = cuda.shared.array(STAGE, dt)
        block = cuda.shared.array(ACC, dt)
        partial = cuda.shared.array(REDUCE, dt)
        row_scale = cuda.shared.array(ROWS, dt)
        return first, second, block, partial, row_scale

    @cuda.jit(device=True, inline=True)
    def shifted_dot(sa, sb, stride, red, x, x_row0, y, y_row0, b, h, features):
        """x[b, h, x_row0 + r] . y[b, h, y_row0 + r] for this thread's row r (0 for rows outside [0, L)),
        every thread of the block getting its row's value: both tiles staged chunk by chunk."""
        r, lane, lanes = cuda.threadIdx.y, cuda.threadIdx.x, cuda.blockDim.x
        part = ZERO
        for d0 in range(0, features, CHUNK):
            width = min(CHUNK, features - d0)
            stage_rows(sa, sb, stride, x, x_row0, y, y_row0, b, h, cuda.blockDim.y, d0, width, True)
            part += lane_dot(sa, r * stride, sb, r * stride, width, lane, lanes)
        return tree_sum(red, lane, lanes, 1, r * lanes, part)

    @cuda.jit(device=True, inline=True)
    def accumulate(acc, astride, c0, columns, tile, stride, x, b, h, row0, decay, weight):
        """acc[r, :columns] = decay * acc[r] + weight * x[b, h, row0 + r, c0 : c0 + columns], this thread's row
        r and lanes, x staged chunk by chunk."""
        r, lane, lanes = cuda.threadIdx.y, cuda.threadIdx.x, cuda.blockDim.x
        for d0 in range(c0, c0 + columns, CHUNK):
            width = min(CHUNK, c0 + columns - d0)
            stage_rows(tile, tile, stride, x, row0, x, row0, b, h, cuda.blockDim.y, d0, width, False)
            lane_axpy(acc, r * astride + d0 - c0, decay, tile, weight, r * stride, width, lane, lanes)

    @cuda.jit(device=True, inline=True)
    def clear(acc, astride, columns):
        r, lane, lanes = cuda.threadIdx.y, cuda.threadIdx.x, cuda.blockDim.x
        for d in range(lane, columns, lanes):
            acc[r * astride + d] = ZERO

    @cuda.jit(device=True, inline=True)
    def store(acc, astride, row_scale, target, b, h, row0, c0, columns):
        """target[b, h, row0 + r, c0 : c0 + columns] = acc[r] * row_scale[r] for the block's rows inside
        [0, L): consecutive threads store consecutive features (coalesced)."""
        length = target.shape[2]
        threads = cuda.blockDim.x * cuda.blockDim.y
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockDim.y * columns, threads):
            r = e // columns
            c = e - r * columns
            if row0 + r < length:
                target[b, h, row0 + r, c0 + c] = acc[r * astride + c] * row_scale[r]
        cuda.syncthreads()  # the block may be refilled right after

    @cuda.jit(device=True, inline=True)
    def pair_ok(valid, b, i, j, length, shift, causal, tau):
        """Is (i, j = i + tau) a valid pair with a finite bias?"""
        bv = b if valid.shape[0] > 1 else 0
        return (i < length and 0 <= j < length and shift > NEG_INF and not (causal and tau > 0)
                and valid[bv, i] != ZERO and valid[bv, j] != ZERO)

    @kernel("F4 F4 F4 I3 F3 i i F2 f F4 F3", shared=SHARED)
    def sparse_forward_k(q, k, v, offsets, bias, has_bias, causal, valid, scale, out, lse):
        """out_i = sum_m softmax_m(z_im) v_(i + tau_m), z_im = scale q_i . k_(i + tau_m) + bias_m over the valid
        pairs, lse_i = log sum_m exp(z_im) (-inf, and out 0, for a row with none). Online softmax over the
        offsets, the output block rescaled in shared memory.

        As in the reference, a logit of -inf (q . k overflowed below the dtype's range) gets weight 0, and
        one of +inf or NaN (an overflow the other way) makes the row's sum, out and lse NaN for the caller's
        overflow check: the sum is 0 only for a row without a counted pair (the pair at the running maximum
        adds exp(0) = 1), so the row's finish tests ``run_sum != 0`` (``run_sum > 0`` would read NaN as no
        pair, lse -inf, which the check allows)."""
        qs, ks, acc, red, row_scale = query_tiles()
        heads, length, dim, dim_v = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        b, h, i0, stride, astride = tile_of(length, heads)
        r = cuda.threadIdx.y
        i = i0 + r
        for c0 in range(0, dim_v, RES):
            columns = min(RES, dim_v - c0)
            clear(acc, astride, columns)
            run_max = NEG_INF
            run_sum = ZERO
            for m in range(offsets.shape[2]):
                tau = offsets[b, h, m]
                shift = bias[b, h, m] if has_bias else ZERO
                z = shifted_dot(qs, ks, stride, red, q, i0, k, i0 + tau, b, h, dim) * scale + shift
                decay = ONE
                weight = ZERO
                if pair_ok(valid, b, i, i + tau, length, shift, causal, tau) and z != NEG_INF:
                    run_max, decay = rescale(run_max, z)
                    weight = math.exp(z - run_max)
                    run_sum = run_sum * decay + weight
                accumulate(acc, astride, c0, columns, ks, stride, v, b, h, i0 + tau, decay, weight)
            if cuda.threadIdx.x == 0:
                row_scale[r] = ONE / run_sum if run_sum != ZERO else ZERO
                if c0 == 0 and i < length:
                    lse[b, h, i] = run_max + math.log(run_sum) if run_sum != ZERO else NEG_INF
            store(acc, astride, row_scale, out, b, h, i0, c0, columns)

    @kernel("F4 F4 F4 I3 F3 i i F2 f F4 F3 F4 F3 i F4 F4 F4", shared=SHARED)
    def sparse_backward_query_k(q, k, v, offsets, bias, has_bias, causal, valid, scale, out, lse, dout, dlse,
                                has_dlse, probs, dz, dq):
        """Per query tile: delta_i = dout_i . out_i - dlse_i, then for every offset p_im = exp(z_im - lse_i),
        dz_im = p_im (dout_i . v_j - delta_i) (0 off the valid pairs), written to probs and dz (B, H, L, K),
        and dq_i = scale sum_m dz_im k_j accumulated in shared memory."""
        qs, ks, acc, red, row_scale = query_tiles()
        heads, length, dim, dim_v = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        b, h, i0, stride, astride = tile_of(length, heads)
        r = cuda.threadIdx.y
        i = i0 + r
        row_lse = lse[b, h, i] if i < length else NEG_INF
        delta = shifted_dot(qs, ks, stride, red, dout, i0, out, i0, b, h, dim_v)
        if has_dlse and row_lse > NEG_INF:
            delta -= dlse[b, h, i]
        if cuda.threadIdx.x == 0:
            row_scale[r] = scale
        for c0 in range(0, dim, RES):
            columns = min(RES, dim - c0)
            clear(acc, astride, columns)
            for m in range(offsets.shape[2]):
                tau = offsets[b, h, m]
                shift = bias[b, h, m] if has_bias else ZERO
                z = shifted_dot(qs, ks, stride, red, q, i0, k, i0 + tau, b, h, dim) * scale + shift
                dp = shifted_dot(qs, ks, stride, red, dout, i0, v, i0 + tau, b, h, dim_v)
                p = ZERO
                # The forward's pairs (a NaN lse, an overflow, gives NaN weights: the gradients' check reports it).
                if row_lse != NEG_INF and pair_ok(valid, b, i, i + tau, length, shift, causal, tau) and z != NEG_INF:
                    p = math.exp(z - row_lse)
                g = p * (dp - delta)
                if c0 == 0 and cuda.threadIdx.x == 0 and i < length:
                    probs[b, h, i, m] = p
                    dz[b, h, i, m] = g
                accumulate(acc, astride, c0, columns, ks, stride, k, b, h, i0 + tau, ONE, g)
            store(acc, astride, row_scale, dq, b, h, i0, c0, columns)

    @cuda.jit(device=True, inline=True)
    def gather_keys(acc, astride, row_scale, tile, stride, x, weights, target, offsets, b, h, j0):
        """target[b, h, j] = row_scale * sum_m weights[b, h, j - tau_m, m] x[b, h, j - tau_m] for the block's
        keys j (the query of key j at offset tau is j - tau, a contiguous tile per offset)."""
        r = cuda.threadIdx.y
        length = x.shape[2]
        j = j0 + r
        for c0 in range(0, x.shape[3], RES):
            columns = min(RES, x.shape[3] - c0)
            clear(acc, astride, columns)
            for m in range(offsets.shape[2]):
                tau = offsets[b, h, m]
                i = j - tau
                weight = weights[b, h, i, m] if j < length and 0 <= i < length else ZERO
                accumulate(acc, astride, c0, columns, tile, stride, x, b, h, j0 - tau, ONE, weight)
            store(acc, astride, row_scale, target, b, h, j0, c0, columns)

    @kernel("F4 F4 I3 F4 F4 f F4 F4", shared=KEY_SHARED)
    def sparse_backward_key_k(q, dout, offsets, probs, dz, scale, dk, dv):
        """Per key tile: dk_j = scale sum_m dz[j - tau_m, m] q_(j - tau_m), dv_j = sum_m p[j - tau_m, m]
        dout_(j - tau_m), each accumulated in shared memory (a gather: no atomics)."""
        ks = cuda.shared.array(STAGE, dt)
        acc = cuda.shared.array(ACC, dt)
        row_scale = cuda.shared.array(ROWS, dt)
        b, h, j0, stride, astride = tile_of(q.shape[2], q.shape[1])
        r = cuda.threadIdx.y
        if cuda.threadIdx.x == 0:
            row_scale[r] = scale
        gather_keys(acc, astride, row_scale, ks, stride, q, dz, dk, offsets, b, h, j0)
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            row_scale[r] = ONE
        gather_keys(acc, astride, row_scale, ks, stride, dout, probs, dv, offsets, b, h, j0)

    @kernel("F4 F3", shared=SUM_BLOCK * size)
    def sum_over_length_k(x, total):
        """total[b, h, m] = sum_i x[b, h, i, m]: blocks over (b * H + h, group of blockDim.x columns m), the
        lanes on consecutive m (coalesced), blockDim.y rows of i, then a tree sum over the rows."""
        buf = cuda.shared.array(SUM_BLOCK, dt)
        heads, length, top = x.shape[1], x.shape[2], x.shape[3]
        lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
        y, rows = cuda.threadIdx.y, cuda.blockDim.y
        groups = (top + lanes - 1) // lanes
        bh = cuda.blockIdx.x // groups
        b = bh // heads
        h = bh - b * heads
        m = (cuda.blockIdx.x - bh * groups) * lanes + lane
        acc = ZERO
        if m < top:
            for i in range(y, length, rows):
                acc += x[b, h, i, m]
        result = tree_sum(buf, y, rows, lanes, lane, acc)
        if y == 0 and m < top:
            total[b, h, m] = result

    return table

