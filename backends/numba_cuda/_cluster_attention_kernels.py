"""The kernels of Routing steps 4-6 in the Numba-CUDA backend: cluster attention, combine, local attention.

:func:`build` returns, for a Numba float type, every kernel as a plain Python function with its
signature spec (see :mod:`._kernels`). The attention kernels follow FSAT's sparse kernels
(:mod:`._fsat_kernels`): one thread per query (or, in the key-side backward, per key), one block per
tile of TILE of them, key (query) rows staged through a shared-memory slab of TILE rows x CHUNK
features by coalesced loads (consecutive threads read consecutive features of a row), and an online
softmax (running maximum and sum, the output row rescaled in place) so that no W x W or L x 3B
array of logits exists in global memory: per block only a TILE x TILE tile of logits, in shared
memory, laid out [key, query] so that each thread's column is bank-conflict free.

Cluster windows are often far below TILE, so a cluster-attention block holds blockDim.y groups
(cells), each a cluster's tile of slots with its own rows of the shared arrays: G groups of at most
TILE / G slots on both sides fill the same TILE-row slab and TILE x TILE logits that one large
cluster does, instead of G blocks that each leave most of a warp idle. Staged rows are therefore
flat rows (b * H + h) * L + t (the groups' (b, h) may differ); the host puts one group per block
when either window exceeds TILE / 2.

The backward kernels recompute the logits from the forward's log-sum-exp, as FSAT's sparse backward
does. In cluster attention a token can be a member of several clusters, so its gradient rows are
summed with ``cuda.atomic.add`` (float32/float64 atomics, sm_60 and later), as are the outputs of
``combine``: the order of those sums depends on scheduling, so results can differ between runs in
the last bits (well within the tolerance table of spec/interface.md). Local attention has a gather
formulation (each key row is owned by one thread of the key-side kernel) and is deterministic.

Slab staging is an inline device function (``inline=True``): a non-inlined ``cuda.jit(device=True)``
function makes ``compile_ptx`` initialise the CUDA driver, an inlined one does not.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, int64

from ._kernels import CHUNK, SLAB, TILE, KernelTable, registry

LOGITS = TILE * TILE  # a TILE x TILE tile of logits (a literal constant for cuda.shared.array)


def build(dt: Any) -> KernelTable:
    """Every kernel of Routing steps 4-6 for the float type ``dt``: name -> (python function, signature spec)."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    kernels, kernel = registry()

    # ------------------------------------------------------------------ slab staging (inline device functions)

    @cuda.jit(device=True, inline=True)
    def stage(slab, x, rows, count, d0):
        """slab[r, :w] = x[b, h, t, d0 : d0 + w] for r < count, where rows[r] = (b * H + h) * L + t is a
        flat row of x (B, H, L, F) (zeros where rows[r] < 0), w = min(CHUNK, F - d0); the rows may
        belong to different (b, h). A barrier before (earlier readers of the slab, writers of
        ``rows``) and after (the slab is complete). Every thread of the block must call it."""
        heads, length = x.shape[1], x.shape[2]
        width = min(CHUNK, x.shape[3] - d0)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, count * width,
                       cuda.blockDim.x * cuda.blockDim.y):
            r = e // width
            n = rows[r]
            slab[r * CHUNK + e % width] = x[n // (heads * length), (n // length) % heads, n % length,
                                             d0 + e % width] if n >= 0 else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def stage_slots(slab, x, cells, count, w0, d0):
        """slab[r, :w] = x[b, h, c, w0 + r % count, d0 : d0 + w] for r < blockDim.y * count: the slot rows
        w0 .. w0 + count of x (B, H, C, W, F) for each group's cluster (b * H + h) * C + c =
        cells[r // count] (zeros where it is -1). Barriers as :func:`stage`."""
        heads, clusters = x.shape[1], x.shape[2]
        width = min(CHUNK, x.shape[4] - d0)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockDim.y * count * width,
                       cuda.blockDim.x * cuda.blockDim.y):
            r = e // width
            n = cells[r // count]
            slab[r * CHUNK + e % width] = x[n // (heads * clusters), (n // clusters) % heads, n % clusters,
                                             w0 + r % count, d0 + e % width] if n >= 0 else ZERO
        cuda.syncthreads()

    # ------------------------------------------------------------------ step 4: cluster attention

    @kernel("F4 F4 F4 I4 I4 i i f f F5 F4")
    def cluster_fwd_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse):
        """o[b, h, c, w] = sum_u softmax_u(z_wu) v[k_members[c, u]], lse[b, h, c, w] = log sum_u exp(z_wu).

        z_wu = scale fq_i · fk_j for query i = q_members[c, w] and key j = k_members[c, u], over the
        valid keys (j >= 0, j <= i when causal; z = self_logit where j = i when self_masked).
        Cells (b * H + h, c, query tile), flattened (tile fastest), blockDim.y of them per block (a
        group each: small clusters share a block, see the module notes); one thread per query slot.
        Key tiles of TILE slots (one tile for every group when they share a block): each group's fk
        rows staged in the slab, its logits in shared memory, online softmax, then the v rows staged
        and the output row (in o) rescaled and accumulated. Empty query slots and queries with no
        valid key get o = 0 and lse = -inf.
        """
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)  # [key row * TILE + query thread], a group's key rows together
        keys = cuda.shared.array(TILE, int64)  # flat rows (b * H + h) * L + j of the key tile, -1 if empty
        batch, heads, length = fq.shape[0], fq.shape[1], fq.shape[2]
        dim, dim_v = fq.shape[3], v.shape[3]
        clusters, wq = q_members.shape[2], q_members.shape[3]
        wk = k_members.shape[3]
        tid = cuda.threadIdx.x
        tiles = (wq + cuda.blockDim.x - 1) // cuda.blockDim.x
        cell = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = cell < batch * heads * clusters * tiles
        w = (cell % tiles) * cuda.blockDim.x + tid
        c = (cell // tiles) % clusters
        bh = cell // (tiles * clusters)
        b = bh // heads
        h = bh % heads
        row0 = bh * length  # the flat row of (b, h, 0)
        slot = active and w < wq
        i = q_members[b, h, c, w] if slot else -1
        run_max = NEG_INF
        run_sum = ZERO
        if slot:
            for e in range(dim_v):
                o[b, h, c, w, e] = ZERO
        for u0 in range(0, wk, TILE):
            count = min(TILE, wk - u0)
            first = cuda.threadIdx.y * count  # this group's rows in keys, the slab and the logits
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                j = k_members[b, h, c, u0 + r] if active else -1
                keys[first + r] = row0 + j if j >= 0 else -1
            for r in range(count):
                logits[(first + r) * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage(slab, fk, keys, cuda.blockDim.y * count, d0)
                if i >= 0:
                    for x in range(min(CHUNK, dim - d0)):
                        f = fq[b, h, i, d0 + x]
                        for r in range(count):
                            logits[(first + r) * TILE + tid] += f * slab[(first + r) * CHUNK + x]
            tile_max = NEG_INF
            if i >= 0:
                for r in range(count):
                    j = keys[first + r] - row0  # < 0 for an empty key slot
                    z = NEG_INF
                    if j >= 0 and not (causal and j > i):
                        z = self_logit if (self_masked and j == i) else logits[(first + r) * TILE + tid] * scale
                    logits[(first + r) * TILE + tid] = z
                    tile_max = max(tile_max, z)
            live = tile_max > NEG_INF  # this tile has a valid key for this query
            correction = ONE
            if live:
                new_max = max(run_max, tile_max)
                correction = math.exp(run_max - new_max)
                total = ZERO
                for r in range(count):
                    p = math.exp(logits[(first + r) * TILE + tid] - new_max)
                    logits[(first + r) * TILE + tid] = p
                    total += p
                run_sum = run_sum * correction + total
                run_max = new_max
            for d0 in range(0, dim_v, CHUNK):
                stage(slab, v, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim_v - d0)):
                        acc = o[b, h, c, w, d0 + x] * correction
                        for r in range(count):
                            acc += logits[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        o[b, h, c, w, d0 + x] = acc
        if slot:
            if run_sum > ZERO:
                inverse = ONE / run_sum
                for e in range(dim_v):
                    o[b, h, c, w, e] *= inverse
                lse[b, h, c, w] = run_max + math.log(run_sum)
            else:
                lse[b, h, c, w] = NEG_INF

    @kernel("F4 F4 F4 I4 I4 i i f f F5 F4 F5 F4 F4")
    def cluster_bwd_q_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse, do, delta,
                        dfq):
        """Query side of the backward: delta_w = do_w · o_w, and dfq[i] += scale sum_u dz_wu fk_j (atomic).

        Same cells, groups and key tiling as :func:`cluster_fwd_k`. Per key tile: the logits again
        from the fk slab, dp_wu = do_w · v_j from the v slab, p_wu = exp(z_wu - lse_w), dz_wu = p_wu
        (dp_wu - delta_w) (0 where z is the constant self logit), then the fk slab once more for dfq.
        A token that is a query in several clusters receives the sum of its slots, hence the atomics.
        Writes delta (B, H, C, Wq) for :func:`cluster_bwd_kv_k`.
        """
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)  # z, [key row * TILE + query thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        keys = cuda.shared.array(TILE, int64)  # flat key rows, as in cluster_fwd_k
        batch, heads, length = fq.shape[0], fq.shape[1], fq.shape[2]
        dim, dim_v = fq.shape[3], v.shape[3]
        clusters, wq = q_members.shape[2], q_members.shape[3]
        wk = k_members.shape[3]
        tid = cuda.threadIdx.x
        tiles = (wq + cuda.blockDim.x - 1) // cuda.blockDim.x
        cell = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = cell < batch * heads * clusters * tiles
        w = (cell % tiles) * cuda.blockDim.x + tid
        c = (cell // tiles) % clusters
        bh = cell // (tiles * clusters)
        b = bh // heads
        h = bh % heads
        row0 = bh * length
        slot = active and w < wq
        i = q_members[b, h, c, w] if slot else -1
        row_lse = NEG_INF
        row_delta = ZERO
        if slot:
            for e in range(dim_v):
                row_delta += do[b, h, c, w, e] * o[b, h, c, w, e]
            delta[b, h, c, w] = row_delta
            row_lse = lse[b, h, c, w]
        live = i >= 0 and row_lse > NEG_INF  # a query with no valid key has no gradient
        for u0 in range(0, wk, TILE):
            count = min(TILE, wk - u0)
            first = cuda.threadIdx.y * count
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                j = k_members[b, h, c, u0 + r] if active else -1
                keys[first + r] = row0 + j if j >= 0 else -1
            for r in range(count):
                logits[(first + r) * TILE + tid] = ZERO
                grads[(first + r) * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage(slab, fk, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        f = fq[b, h, i, d0 + x]
                        for r in range(count):
                            logits[(first + r) * TILE + tid] += f * slab[(first + r) * CHUNK + x]
            for d0 in range(0, dim_v, CHUNK):
                stage(slab, v, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim_v - d0)):
                        g = do[b, h, c, w, d0 + x]
                        for r in range(count):
                            grads[(first + r) * TILE + tid] += g * slab[(first + r) * CHUNK + x]
            if live:
                for r in range(count):
                    j = keys[first + r] - row0  # < 0 for an empty key slot
                    g = ZERO
                    if j >= 0 and not (causal and j > i) and not (self_masked and j == i):
                        p = math.exp(logits[(first + r) * TILE + tid] * scale - row_lse)
                        g = p * (grads[(first + r) * TILE + tid] - row_delta)
                    grads[(first + r) * TILE + tid] = g
            for d0 in range(0, dim, CHUNK):
                stage(slab, fk, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        if acc != ZERO:
                            cuda.atomic.add(dfq, (b, h, i, d0 + x), acc * scale)

    @kernel("F4 F4 F4 I4 I4 i i f f F4 F5 F4 F4 F4")
    def cluster_bwd_kv_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, lse, do, delta,
                         dfk, dv):
        """Key side of the backward: dfk[j] += scale sum_w dz_wu fq_i and dv[j] += sum_w p_wu do_w (atomic).

        Cells (b * H + h, c, key tile), blockDim.y of them per block as in :func:`cluster_fwd_k`, one
        thread per key slot u; query tiles of TILE slots with their positions, lse and delta staged in
        shared memory: the logits from the fq slab, p = exp(z - lse), then the do slab gives dp_wu =
        do_w · v_j and dv at once, dz = p (dp - delta) (0 at the constant self logit), and the fq slab
        once more for dfk. A token that is a key in several clusters receives the sum of its slots,
        hence the atomics.
        """
        slab = cuda.shared.array(SLAB, dt)
        probs = cuda.shared.array(LOGITS, dt)  # z, then p, [query row * TILE + key thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        queries = cuda.shared.array(TILE, int64)  # flat rows (b * H + h) * L + i of the query tile, -1 if empty
        row_lse = cuda.shared.array(TILE, dt)
        row_delta = cuda.shared.array(TILE, dt)
        cells = cuda.shared.array(TILE, int64)  # each group's cluster (b * H + h) * C + c, -1 past the last
        batch, heads, length = fq.shape[0], fq.shape[1], fq.shape[2]
        dim, dim_v = fq.shape[3], v.shape[3]
        clusters, wq = q_members.shape[2], q_members.shape[3]
        wk = k_members.shape[3]
        tid = cuda.threadIdx.x
        group = cuda.threadIdx.y
        tiles = (wk + cuda.blockDim.x - 1) // cuda.blockDim.x
        cell = cuda.blockIdx.x * cuda.blockDim.y + group
        active = cell < batch * heads * clusters * tiles
        u = (cell % tiles) * cuda.blockDim.x + tid
        c = (cell // tiles) % clusters
        bh = cell // (tiles * clusters)
        b = bh // heads
        h = bh % heads
        row0 = bh * length
        j = k_members[b, h, c, u] if active and u < wk else -1
        if tid == 0:
            cells[group] = bh * clusters + c if active else -1
        for w0 in range(0, wq, TILE):
            count = min(TILE, wq - w0)
            first = group * count  # this group's rows in queries, row_lse, row_delta, the slab and probs
            # No barrier before refilling the tile arrays: the previous tile read them before the
            # closing barrier of its last stage, and the first stage below opens with one.
            for r in range(tid, count, cuda.blockDim.x):
                i = q_members[b, h, c, w0 + r] if active else -1
                queries[first + r] = row0 + i if i >= 0 else -1
                row_lse[first + r] = lse[b, h, c, w0 + r] if active else NEG_INF
                row_delta[first + r] = delta[b, h, c, w0 + r] if active else ZERO
            for r in range(count):
                probs[(first + r) * TILE + tid] = ZERO
                grads[(first + r) * TILE + tid] = ZERO
            for d0 in range(0, dim, CHUNK):
                stage(slab, fq, queries, cuda.blockDim.y * count, d0)
                if j >= 0:
                    for x in range(min(CHUNK, dim - d0)):
                        f = fk[b, h, j, d0 + x]
                        for r in range(count):
                            probs[(first + r) * TILE + tid] += f * slab[(first + r) * CHUNK + x]
            if j >= 0:
                for r in range(count):
                    i = queries[first + r] - row0  # < 0 for an empty query slot
                    p = ZERO
                    if i >= 0 and row_lse[first + r] > NEG_INF and not (causal and j > i):
                        z = self_logit if (self_masked and j == i) else probs[(first + r) * TILE + tid] * scale
                        p = math.exp(z - row_lse[first + r])
                    probs[(first + r) * TILE + tid] = p
            for d0 in range(0, dim_v, CHUNK):
                stage_slots(slab, do, cells, count, w0, d0)
                if j >= 0:
                    for x in range(min(CHUNK, dim_v - d0)):
                        f = v[b, h, j, d0 + x]
                        acc = ZERO
                        for r in range(count):
                            grads[(first + r) * TILE + tid] += f * slab[(first + r) * CHUNK + x]
                            acc += probs[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        if acc != ZERO:
                            cuda.atomic.add(dv, (b, h, j, d0 + x), acc)
            if j >= 0:
                for r in range(count):
                    g = probs[(first + r) * TILE + tid] * (grads[(first + r) * TILE + tid] - row_delta[first + r])
                    grads[(first + r) * TILE + tid] = ZERO if (self_masked and row0 + j == queries[first + r]) else g
            for d0 in range(0, dim, CHUNK):
                stage(slab, fq, queries, cuda.blockDim.y * count, d0)
                if j >= 0:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        if acc != ZERO:
                            cuda.atomic.add(dfk, (b, h, j, d0 + x), acc * scale)

    # ------------------------------------------------------------------ step 5: combine

    @kernel("I4 I3")
    def combine_count_k(members, counts):
        """counts[b, h, t] += 1 for every filled slot holding t (atomic); one thread per slot."""
        idx = cuda.grid(1)
        batch, heads, clusters, window = members.shape
        if idx >= batch * heads * clusters * window:
            return
        w = idx % window
        c = (idx // window) % clusters
        h = (idx // (window * clusters)) % heads
        b = idx // (window * clusters * heads)
        t = members[b, h, c, w]
        if t >= 0:
            cuda.atomic.add(counts, (b, h, t), 1)

    @kernel("F5 I4 I3 f F4")
    def combine_k(o, members, counts, eps, out):
        """out[b, h, t, e] += o[b, h, c, w, e] / (counts[b, h, t] + eps) with t = members[b, h, c, w] (atomic).

        One thread per element of o, the feature fastest (coalesced reads and atomics); empty slots skipped.
        """
        idx = cuda.grid(1)
        batch, heads, clusters, window, dim_v = o.shape
        if idx >= batch * heads * clusters * window * dim_v:
            return
        e = idx % dim_v
        slot = idx // dim_v
        w = slot % window
        c = (slot // window) % clusters
        h = (slot // (window * clusters)) % heads
        b = slot // (window * clusters * heads)
        t = members[b, h, c, w]
        if t >= 0:
            cuda.atomic.add(out, (b, h, t, e), o[b, h, c, w, e] / (dt(counts[b, h, t]) + eps))

    @kernel("F4 I4 I3 f F5")
    def combine_vjp_k(dout, members, counts, eps, do):
        """do[b, h, c, w, e] = dout[b, h, t, e] / (counts[b, h, t] + eps), t = members[b, h, c, w]; 0 at empty slots.

        A gather: one thread per element of do, the feature fastest.
        """
        idx = cuda.grid(1)
        batch, heads, clusters, window, dim_v = do.shape
        if idx >= batch * heads * clusters * window * dim_v:
            return
        e = idx % dim_v
        slot = idx // dim_v
        w = slot % window
        c = (slot // window) % clusters
        h = (slot // (window * clusters)) % heads
        b = slot // (window * clusters * heads)
        t = members[b, h, c, w]
        do[b, h, c, w, e] = dout[b, h, t, e] / (dt(counts[b, h, t]) + eps) if t >= 0 else ZERO

    # ------------------------------------------------------------------ step 6: local attention

    @kernel("F4 F4 F4 I2 i i f F4 F3")
    def local_fwd_k(q, k, v, padded, block, causal, scale, out, lse):
        """out_i = sum_j softmax_j(scale q_i · k_j) v_j over the keys i sees, lse_i = log sum_j exp(·).

        Query i sees key j iff |i // block - j // block| <= 1, j <= i when causal, and neither is
        padded (``padded`` (B or 1, L), nonzero = padding). One block per (b * H + h, query tile),
        flattened (tile fastest), one thread per query; the block runs over the contiguous key range
        its queries can see, in tiles of TILE rows staged like :func:`cluster_fwd_k`'s (each thread
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
                stage(slab, k, keys, count, d0)
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
                stage(slab, v, keys, count, d0)
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

    @kernel("F4 F4 F4 I2 i i f F4 F3 F4 F3 F4")
    def local_bwd_q_k(q, k, v, padded, block, causal, scale, out, lse, dout, delta, dq):
        """Query side: delta_i = dout_i · out_i and dq_i = scale sum_j dz_ij k_j, dz_ij = p_ij (dout_i · v_j - delta_i).

        Grid and key range as :func:`local_fwd_k`; p = exp(z - lse) recomputed per key tile. Each
        dq row is owned by one thread (no atomics). Writes delta (B, H, L) for :func:`local_bwd_kv_k`.
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
                stage(slab, k, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        f = q[b, h, i, d0 + x]
                        for r in range(count):
                            logits[r * TILE + tid] += f * slab[r * CHUNK + x]
            for d0 in range(0, dim_v, CHUNK):
                stage(slab, v, keys, count, d0)
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
                stage(slab, k, keys, count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[r * TILE + tid] * slab[r * CHUNK + x]
                        dq[b, h, i, d0 + x] += acc * scale

    @kernel("F4 F4 F4 I2 i i f F3 F4 F3 F4 F4")
    def local_bwd_kv_k(q, k, v, padded, block, causal, scale, lse, dout, delta, dk, dv):
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
                stage(slab, q, queries, count, d0)
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
                stage(slab, dout, queries, count, d0)
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
                stage(slab, q, queries, count, d0)
                if active:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[r * TILE + tid] * slab[r * CHUNK + x]
                        dk[b, h, j, d0 + x] += acc * scale

    return kernels
