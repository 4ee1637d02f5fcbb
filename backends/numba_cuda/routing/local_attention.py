"""Routing step 6 on the device (:mod:`refattn.routing.local_attention`, whose checks it runs).

How it differs from the reference: fused kernels instead of (L / B) blocks of B x 3B logits, tiled
as :mod:`.cluster_attention`'s: one block per (b * H + h, tile of TILE positions), one thread per
query (per key in the key-side backward), over the contiguous range of partners the tile can see,
staged in shared slabs; an online softmax; the key-side backward is a gather (each key row owned by
one thread): deterministic, no atomics.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda, int64

from refattn.routing.local_attention import OVERFLOWS, check_local_attention, check_local_attention_vjp

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .cluster_attention import LOGITS, SLAB, TILE, tile_shared

__all__ = ["local_attention", "local_attention_vjp", "local_attention_core", "local_attention_vjp_core"]


class Local(NamedTuple):
    """One local-attention call's configuration, on the device."""

    block: int  # min(block, L): a block of L or more tokens is one block holding everything
    causal: int
    padded: Any  # (B or 1, L) int64, nonzero = padding
    scale: Any  # 1 / sqrt(D) in the compute dtype


def local_setup(call: Call, q: Any, block: int, causal: bool, mask: np.ndarray | None) -> Local:
    length = q.shape[2]
    padded = call.zeros((1, length), np.int64) if mask is None else call.upload(mask, np.int64)
    return Local(min(block, length), int(causal), padded, call.scalar(1.0 / math.sqrt(q.shape[3])))


def local_launch(length: int, batch_heads: int) -> tuple[int, int]:
    """(blocks, threads): one block per (b * H + h, tile of up to TILE positions)."""
    threads = min(TILE, length)
    return batch_heads * -(-length // threads), threads


def local_forward(call: Call, local: Local, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """(out (B, H, L, Dv), lse (B, H, L)) on the device."""
    batch, heads, length, _ = q.shape
    out = call.empty((batch, heads, length, v.shape[3]))
    lse = call.empty((batch, heads, length))
    call.launch("local_forward_k", *local_launch(length, batch * heads), q, k, v, local.padded, local.block,
                local.causal, local.scale, out, lse)
    return out, lse


def local_attention_core(call: Call, q: Any, k: Any, v: Any, block: int, *, causal: bool = False,
                         key_padding_mask: Any = None) -> Any:
    """out (B, H, L, Dv) on the device."""
    return local_forward(call, local_setup(call, q, block, causal, key_padding_mask), q, k, v)[0]


def local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.routing.local_attention` on the device."""
    call, (q, k, v, block, causal, key_padding_mask) = intake(check_local_attention, q, k, v, block, causal,
                                                              key_padding_mask)
    out = local_attention_core(call, q, k, v, block, causal=causal, key_padding_mask=key_padding_mask)
    call.watch_rules(out, OVERFLOWS["local_attention"], q=q, k=k)
    return call.out(out)


def local_attention_vjp_core(call: Call, q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False,
                             key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) on the device."""
    batch, heads, length, _ = q.shape
    local = local_setup(call, q, block, causal, key_padding_mask)
    out, lse = local_forward(call, local, q, k, v)
    delta = call.empty(lse.shape)
    dq = call.empty(q.shape)
    dk = call.empty(k.shape)
    dv = call.empty(v.shape)
    launch = local_launch(length, batch * heads)
    call.launch("local_backward_query_k", *launch, q, k, v, local.padded, local.block, local.causal, local.scale,
                out, lse, dout, delta, dq)
    call.launch("local_backward_key_k", *launch, q, k, v, local.padded, local.block, local.causal, local.scale,
                lse, dout, delta, dk, dv)
    return dq, dk, dv


def local_attention_vjp(q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False,
                        key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """:func:`refattn.routing.local_attention_vjp` on the device."""
    call, (q, k, v, block, dout, causal, key_padding_mask) = intake(
        check_local_attention_vjp, q, k, v, block, dout, causal, key_padding_mask)
    dq, dk, dv = local_attention_vjp_core(call, q, k, v, block, dout, causal=causal,
                                          key_padding_mask=key_padding_mask)
    call.watch_rules((dq, dk, dv), OVERFLOWS["local_attention_vjp"], q=q, k=k, v=v, dout=dout)
    return call.out(dq, dk, dv)


def kernels(dt: Any) -> KernelTable:
    """The local-attention kernels for the float type ``dt``."""
    ZERO, ONE, NEG_INF, size = dt(0.0), dt(1.0), dt(-math.inf), dt.bitwidth // 8
    fn = device.functions(dt)
    listed_products, listed_accumulate, softmax_tile = fn.listed_products, fn.listed_accumulate, fn.softmax_tile
    clear_row, finish_row, row_dot, nan_max = fn.clear_row, fn.finish_row, fn.row_dot, fn.nan_max
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def tile_of(x, padded, block, causal, keys):
        """(b, h, first position p0, flat row of (b, h, 0), padding row, this thread's position p, inside,
        active, partners from, partners to) of this block: blocks over (b * H + h, tile of blockDim.x
        positions), tile fastest; ``inside``: p < L, ``active``: and not padded; the partners are the
        contiguous range of keys the tile's queries see (of queries that see the tile's ``keys``)."""
        heads, length = x.shape[1], x.shape[2]
        tiles = (length + cuda.blockDim.x - 1) // cuda.blockDim.x
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        p0 = (cuda.blockIdx.x - bh * tiles) * cuda.blockDim.x
        bp = b if padded.shape[0] > 1 else 0
        p = p0 + cuda.threadIdx.x
        inside = p < length
        last = min(length, p0 + cuda.blockDim.x) - 1
        lo = p0 if keys and causal else max(0, (p0 // block - 1) * block)
        hi = last + 1 if causal and not keys else min(length, (last // block + 2) * block)
        return b, bh - b * heads, p0, bh * length, bp, p, inside, inside and padded[bp, p] == 0, lo, hi

    @cuda.jit(device=True, inline=True)
    def visible(i, j, block, causal, padded, bp):
        """Does query i see key j: neighbouring blocks, j <= i when causal, key not padded?"""
        return abs(i // block - j // block) <= 1 and not (causal and j > i) and padded[bp, j] == 0

    @cuda.jit(device=True, inline=True)
    def list_range(rows, count, row0):
        """rows[r] = row0 + r for r < count: a contiguous range of flat rows."""
        for r in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            rows[r] = row0 + r

    @cuda.jit(device=True, inline=True)
    def clear_tile(weights, count):
        for r in range(count):
            weights[r * TILE + cuda.threadIdx.x] = ZERO

    @kernel("F4 F4 F4 I2 i i f F4 F3", shared=tile_shared(size, 1, 0, 1))
    def local_forward_k(q, k, v, padded, block, causal, scale, out, lse):
        """out_i = sum_j softmax_j(scale q_i . k_j) v_j over the keys i sees, lse_i = log sum_j exp(.).

        One thread per query; the block runs over the contiguous key range its queries can see (blocks
        n - 1 .. n + 1), in tiles of TILE keys staged in shared memory, each thread masking the keys it
        does not see; an online softmax. A padded query or one with no visible key gets 0, lse -inf."""
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)  # [key r * TILE + query thread]
        keys = cuda.shared.array(TILE, int64)
        b, h, i0, row0, bp, i, inside, active, lo, hi = tile_of(q, padded, block, causal, False)
        run_max = NEG_INF
        run_sum = ZERO
        clear_row(out, b, h, i, inside)
        for j0 in range(lo, hi, TILE):
            count = min(TILE, hi - j0)
            # No barrier before refilling the tile arrays: the previous tile read them before the closing
            # barrier of its last stage, and the first stage below opens with one.
            list_range(keys, count, row0 + j0)
            clear_tile(logits, count)
            listed_products(logits, 0, count, slab, k, keys, count, q, b, h, i, active)
            tile_max = NEG_INF
            if active:
                for r in range(count):
                    z = logits[r * TILE + cuda.threadIdx.x] * scale if visible(i, j0 + r, block, causal, padded,
                                                                                bp) else NEG_INF
                    logits[r * TILE + cuda.threadIdx.x] = z
                    tile_max = nan_max(tile_max, z)  # an overflowed (NaN) logit stays in
            live, decay, run_max, run_sum = softmax_tile(logits, 0, count, tile_max, run_max, run_sum)
            listed_accumulate(out, b, h, i, logits, 0, count, slab, v, keys, count, decay, ONE, live, False)
        finish_row(out, lse, b, h, i, run_max, run_sum, inside)

    @kernel("F4 F4 F4 I2 i i f F4 F3 F4 F3 F4", shared=tile_shared(size, 2, 0, 1))
    def local_backward_query_k(q, k, v, padded, block, causal, scale, out, lse, dout, delta, dq):
        """Query side: delta_i = dout_i . out_i and dq_i = scale sum_j dz_ij k_j, dz_ij = p_ij (dout_i . v_j -
        delta_i), p recomputed from lse; grid and key range as :func:`local_forward_k`; each dq row owned by
        one thread (no atomics). Writes delta for :func:`local_backward_key_k`."""
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        keys = cuda.shared.array(TILE, int64)
        b, h, i0, row0, bp, i, inside, _, lo, hi = tile_of(q, padded, block, causal, False)
        row_lse = NEG_INF
        row_delta = ZERO
        if inside:
            row_delta = row_dot(dout, out, b, h, i)
            delta[b, h, i] = row_delta
            row_lse = lse[b, h, i]
        clear_row(dq, b, h, i, inside)
        # Excludes padded queries and queries with no visible key; a NaN lse (an overflow) stays in, and its
        # NaN gradient reaches the overflow check.
        live = row_lse != NEG_INF
        for j0 in range(lo, hi, TILE):
            count = min(TILE, hi - j0)
            list_range(keys, count, row0 + j0)
            clear_tile(logits, count)
            clear_tile(grads, count)
            listed_products(logits, 0, count, slab, k, keys, count, q, b, h, i, live)
            listed_products(grads, 0, count, slab, v, keys, count, dout, b, h, i, live)
            if live:
                for r in range(count):
                    g = ZERO
                    if visible(i, j0 + r, block, causal, padded, bp):
                        g = math.exp(logits[r * TILE + cuda.threadIdx.x] * scale - row_lse) \
                            * (grads[r * TILE + cuda.threadIdx.x] - row_delta)
                    grads[r * TILE + cuda.threadIdx.x] = g
            listed_accumulate(dq, b, h, i, grads, 0, count, slab, k, keys, count, ONE, scale, live, False)

    @kernel("F4 F4 F4 I2 i i f F3 F4 F3 F4 F4", shared=tile_shared(size, 2, 2, 1))
    def local_backward_key_k(q, k, v, padded, block, causal, scale, lse, dout, delta, dk, dv):
        """Key side: dk_j = scale sum_i dz_ij q_i and dv_j = sum_i p_ij dout_i over the queries that see j.

        One thread per key, over the contiguous range of queries that can see the tile (blocks n - 1 .. n + 1
        of its keys; from the first key on when causal), staged in tiles with their lse and delta. Each key
        row is owned by one thread: a gather, no atomics."""
        slab = cuda.shared.array(SLAB, dt)
        probs = cuda.shared.array(LOGITS, dt)  # z, then p, [query r * TILE + key thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        queries = cuda.shared.array(TILE, int64)
        row_lse = cuda.shared.array(TILE, dt)
        row_delta = cuda.shared.array(TILE, dt)
        b, h, j0, row0, bp, j, inside, active, lo, hi = tile_of(q, padded, block, causal, True)
        clear_row(dk, b, h, j, inside)
        clear_row(dv, b, h, j, inside)
        for i0 in range(lo, hi, TILE):
            count = min(TILE, hi - i0)
            list_range(queries, count, row0 + i0)
            for r in range(cuda.threadIdx.x, count, cuda.blockDim.x):
                row_lse[r] = lse[b, h, i0 + r]
                row_delta[r] = delta[b, h, i0 + r]
            clear_tile(probs, count)
            clear_tile(grads, count)
            listed_products(probs, 0, count, slab, q, queries, count, k, b, h, j, active)
            if active:
                for r in range(count):
                    i = i0 + r
                    p = ZERO
                    if row_lse[r] != NEG_INF and visible(i, j, block, causal, padded, bp) and padded[bp, i] == 0:
                        p = math.exp(probs[r * TILE + cuda.threadIdx.x] * scale - row_lse[r])
                    probs[r * TILE + cuda.threadIdx.x] = p
            listed_products(grads, 0, count, slab, dout, queries, count, v, b, h, j, active)
            listed_accumulate(dv, b, h, j, probs, 0, count, slab, dout, queries, count, ONE, ONE, active, False)
            if active:
                for r in range(count):
                    grads[r * TILE + cuda.threadIdx.x] = probs[r * TILE + cuda.threadIdx.x] \
                        * (grads[r * TILE + cuda.threadIdx.x] - row_delta[r])
            listed_accumulate(dk, b, h, j, grads, 0, count, slab, q, queries, count, ONE, scale, active, False)

    return table
