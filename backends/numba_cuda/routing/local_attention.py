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

from refattn.routing.local_attention import check_local_attention, check_local_attention_vjp

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .cluster_attention import CHUNK, LOGITS, SLAB, TILE

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
    call.watch(out, "the local attention", q=q, k=k)
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
    where = "the gradient of the local attention"
    call.watch(dq, where, dout=dout, v=v, k=k)
    call.watch(dk, where, dout=dout, v=v, q=q)
    call.watch(dv, where, dout=dout)
    return call.out(dq, dk, dv)


def kernels(dt: Any) -> KernelTable:
    """The local-attention kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    size = dt.bitwidth // 8
    FORWARD_SHARED = (SLAB + LOGITS) * size + TILE * 8
    QUERY_SHARED = (SLAB + 2 * LOGITS) * size + TILE * 8
    KEY_SHARED = (SLAB + 2 * LOGITS + 2 * TILE) * size + TILE * 8
    stage_listed_rows = device.functions(dt).stage_listed_rows
    table, kernel = registry()

    @kernel("F4 F4 F4 I2 i i f F4 F3", shared=FORWARD_SHARED)
    def local_forward_k(q, k, v, padded, block, causal, scale, out, lse):
        """out_i = sum_j softmax_j(scale q_i · k_j) v_j over the keys i sees, lse_i = log sum_j exp(·).

        Query i sees key j iff |i // block - j // block| <= 1, j <= i when causal, and neither is
        padded (``padded`` (B or 1, L), nonzero = padding). One block per (b * H + h, query tile),
        flattened (tile fastest), one thread per query; the block runs over the contiguous key range
        its queries can see, in tiles of TILE rows staged like :mod:`.cluster_attention`'s (each thread
        masks the keys it does not see). A padded query or one with no visible key gets 0, lse -inf.
        """
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)  # [key r * TILE + query thread]
        keys = cuda.shared.array(TILE, int64)
        heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
        dim_v = v.shape[3]
        tid = cuda.threadIdx.x
        tiles = (length + cuda.blockDim.x - 1) // cuda.blockDim.x
        i0 = (cuda.blockIdx.x % tiles) * cuda.blockDim.x
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        h = bh % heads
        row0 = bh * length  # the flat row of (b, h, 0): the staged rows are flat
        bp = b if padded.shape[0] > 1 else 0
        i = i0 + tid
        inside = i < length
        active = inside and padded[bp, i] == 0
        last = min(length, i0 + cuda.blockDim.x) - 1
        lo = max(0, (i0 // block - 1) * block)
        hi = last + 1 if causal else min(length, (last // block + 2) * block)
        run_max = NEG_INF
        run_sum = ZERO
        if inside:
            for e in range(dim_v):
                out[b, h, i, e] = ZERO
        for j0 in range(lo, hi, TILE):
            count = min(TILE, hi - j0)
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                keys[r] = row0 + j0 + r
            for r in range(count):
                logits[r * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage_listed_rows(slab, CHUNK, k, keys, count, d0)
                if active:
                    for x in range(min(CHUNK, dim - d0)):
                        f = q[b, h, i, d0 + x]
                        for r in range(count):
                            logits[r * TILE + tid] += f * slab[r * CHUNK + x]
            tile_max = NEG_INF
            if active:
                for r in range(count):
                    j = j0 + r
                    z = NEG_INF
                    if abs(i // block - j // block) <= 1 and not (causal and j > i) and padded[bp, j] == 0:
                        z = logits[r * TILE + tid] * scale
                    logits[r * TILE + tid] = z
                    tile_max = max(tile_max, z)
            live = tile_max > NEG_INF
            correction = ONE
            if live:
                new_max = max(run_max, tile_max)
                correction = math.exp(run_max - new_max)
                total = ZERO
                for r in range(count):
                    p = math.exp(logits[r * TILE + tid] - new_max)
                    logits[r * TILE + tid] = p
                    total += p
                run_sum = run_sum * correction + total
                run_max = new_max
            for d0 in range(0, dim_v, CHUNK):
                stage_listed_rows(slab, CHUNK, v, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim_v - d0)):
                        acc = out[b, h, i, d0 + x] * correction
                        for r in range(count):
                            acc += logits[r * TILE + tid] * slab[r * CHUNK + x]
                        out[b, h, i, d0 + x] = acc
        if inside:
            if run_sum > ZERO:
                inverse = ONE / run_sum
                for e in range(dim_v):
                    out[b, h, i, e] *= inverse
                lse[b, h, i] = run_max + math.log(run_sum)
            else:
                lse[b, h, i] = NEG_INF

    @kernel("F4 F4 F4 I2 i i f F4 F3 F4 F3 F4", shared=QUERY_SHARED)
    def local_backward_query_k(q, k, v, padded, block, causal, scale, out, lse, dout, delta, dq):
        """Query side: delta_i = dout_i · out_i and dq_i = scale sum_j dz_ij k_j, dz_ij = p_ij (dout_i · v_j - delta_i).

        Grid and key range as :func:`local_forward_k`; p = exp(z - lse) recomputed per key tile. Each
        dq row is owned by one thread (no atomics). Writes delta (B, H, L) for :func:`local_backward_key_k`.
        """
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        keys = cuda.shared.array(TILE, int64)
        heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
        dim_v = v.shape[3]
        tid = cuda.threadIdx.x
        tiles = (length + cuda.blockDim.x - 1) // cuda.blockDim.x
        i0 = (cuda.blockIdx.x % tiles) * cuda.blockDim.x
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        h = bh % heads
        row0 = bh * length  # the flat row of (b, h, 0): the staged rows are flat
        bp = b if padded.shape[0] > 1 else 0
        i = i0 + tid
        inside = i < length
        last = min(length, i0 + cuda.blockDim.x) - 1
        lo = max(0, (i0 // block - 1) * block)
        hi = last + 1 if causal else min(length, (last // block + 2) * block)
        row_lse = NEG_INF
        row_delta = ZERO
        if inside:
            for e in range(dim_v):
                row_delta += dout[b, h, i, e] * out[b, h, i, e]
            delta[b, h, i] = row_delta
            row_lse = lse[b, h, i]
            for e in range(dim):
                dq[b, h, i, e] = ZERO
        live = row_lse > NEG_INF  # excludes padded queries and queries with no visible key
        for j0 in range(lo, hi, TILE):
            count = min(TILE, hi - j0)
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                keys[r] = row0 + j0 + r
            for r in range(count):
                logits[r * TILE + tid] = ZERO
                grads[r * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage_listed_rows(slab, CHUNK, k, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        f = q[b, h, i, d0 + x]
                        for r in range(count):
                            logits[r * TILE + tid] += f * slab[r * CHUNK + x]
            for d0 in range(0, dim_v, CHUNK):
                stage_listed_rows(slab, CHUNK, v, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim_v - d0)):
                        g = dout[b, h, i, d0 + x]
                        for r in range(count):
                            grads[r * TILE + tid] += g * slab[r * CHUNK + x]
            if live:
                for r in range(count):
                    j = j0 + r
                    g = ZERO
                    if abs(i // block - j // block) <= 1 and not (causal and j > i) and padded[bp, j] == 0:
                        g = math.exp(logits[r * TILE + tid] * scale - row_lse) * (grads[r * TILE + tid] - row_delta)
                    grads[r * TILE + tid] = g
            for d0 in range(0, dim, CHUNK):
                stage_listed_rows(slab, CHUNK, k, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[r * TILE + tid] * slab[r * CHUNK + x]
                        dq[b, h, i, d0 + x] += acc * scale

    @kernel("F4 F4 F4 I2 i i f F3 F4 F3 F4 F4", shared=KEY_SHARED)
    def local_backward_key_k(q, k, v, padded, block, causal, scale, lse, dout, delta, dk, dv):
        """Key side: dk_j = scale sum_i dz_ij q_i and dv_j = sum_i p_ij dout_i over the queries that see j.

        One block per (b * H + h, key tile), one thread per key, over the contiguous range of queries
        that can see the tile (blocks n - 1 .. n + 1 of its keys; from the first key on when causal),
        staged in query tiles with their lse and delta. Each key row is owned by one thread: a
        gather, no atomics.
        """
        slab = cuda.shared.array(SLAB, dt)
        probs = cuda.shared.array(LOGITS, dt)  # z, then p, [query r * TILE + key thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        queries = cuda.shared.array(TILE, int64)
        row_lse = cuda.shared.array(TILE, dt)
        row_delta = cuda.shared.array(TILE, dt)
        heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
        dim_v = v.shape[3]
        tid = cuda.threadIdx.x
        tiles = (length + cuda.blockDim.x - 1) // cuda.blockDim.x
        j0 = (cuda.blockIdx.x % tiles) * cuda.blockDim.x
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        h = bh % heads
        row0 = bh * length  # the flat row of (b, h, 0): the staged rows are flat
        bp = b if padded.shape[0] > 1 else 0
        j = j0 + tid
        inside = j < length
        active = inside and padded[bp, j] == 0
        last = min(length, j0 + cuda.blockDim.x) - 1
        lo = j0 if causal else max(0, (j0 // block - 1) * block)
        hi = min(length, (last // block + 2) * block)
        if inside:
            for e in range(dim):
                dk[b, h, j, e] = ZERO
            for e in range(dim_v):
                dv[b, h, j, e] = ZERO
        for i0 in range(lo, hi, TILE):
            count = min(TILE, hi - i0)
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                queries[r] = row0 + i0 + r
                row_lse[r] = lse[b, h, i0 + r]
                row_delta[r] = delta[b, h, i0 + r]
            for r in range(count):
                probs[r * TILE + tid] = ZERO
                grads[r * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage_listed_rows(slab, CHUNK, q, queries, count, d0)
                if active:
                    for x in range(min(CHUNK, dim - d0)):
                        f = k[b, h, j, d0 + x]
                        for r in range(count):
                            probs[r * TILE + tid] += f * slab[r * CHUNK + x]
            if active:
                for r in range(count):
                    i = i0 + r
                    p = ZERO
                    if row_lse[r] > NEG_INF and abs(i // block - j // block) <= 1 and not (causal and j > i) \
                            and padded[bp, i] == 0:
                        p = math.exp(probs[r * TILE + tid] * scale - row_lse[r])
                    probs[r * TILE + tid] = p
            for d0 in range(0, dim_v, CHUNK):
                stage_listed_rows(slab, CHUNK, dout, queries, count, d0)
                if active:
                    for x in range(min(CHUNK, dim_v - d0)):
                        f = v[b, h, j, d0 + x]
                        acc = ZERO
                        for r in range(count):
                            grads[r * TILE + tid] += f * slab[r * CHUNK + x]
                            acc += probs[r * TILE + tid] * slab[r * CHUNK + x]
                        dv[b, h, j, d0 + x] += acc
            if active:
                for r in range(count):
                    grads[r * TILE + tid] = probs[r * TILE + tid] * (grads[r * TILE + tid] - row_delta[r])
            for d0 in range(0, dim, CHUNK):
                stage_listed_rows(slab, CHUNK, q, queries, count, d0)
                if active:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[r * TILE + tid] * slab[r * CHUNK + x]
                        dk[b, h, j, d0 + x] += acc * scale

    return table
