"""The kernels of Routing steps 1-3, 7 and 8 in the Numba-CUDA backend: what decides and maintains the clusters.

:func:`build` returns, for a Numba float type, every kernel as a plain Python function with its
signature spec (see :mod:`._kernels`). Every kernel computes in that float type (float32 stays float32).

- Row reductions (normalize, its VJP, the centroid totals, the commitment sums) are shared-memory
  tree reductions; in the per-row kernels a row is one segment of ``width`` lanes (a power of two
  <= 32, each summing several features on its own first) that read consecutive features, so the
  loads are coalesced and a block holds several rows. A reduction over one lane is no tree at all.
- The similarity and its VJP are tiled products: a block computes a GEMM x GEMM tile of its output,
  staging GEMM x GEMM tiles of both operands in shared memory (row stride GEMM + 1 against bank
  conflicts) by coalesced loads along each operand's contiguous axis. ``assign`` runs the same
  tiles over all centroids and keeps a running argmax per token.
- ``route`` maps the similarities to int64 keys whose order is the float order (from ``math.frexp``:
  a bit cast is not available in both the simulator and PTX). A row of at most RANK_THREADS tokens
  is ranked by counting, one thread per token (rank = number of keys before it in the order; the
  members are the ranks below W), several short rows per block, two barriers in all. Longer rows
  take an exact radix select, one block per (b, h, c) row: the keys are transposed to (B, H, C, L)
  through a shared tile, so that the selection kernel reads its row contiguously; it finds the W-th
  largest key 8 bits at a time (shared-memory histogram, then a block scan over the bins), stopping
  as soon as the boundary bin is taken whole or the keys still in play are all equal, and writes the
  members in position order with one block scan per chunk of positions. No L x L array exists; the
  key array of long rows is O(C L) per (b, h).
- The per-cluster statistics of the centroid update are segmented reductions, one block per
  (c, h), with no atomics: the sums are deterministic.

Helpers are inline device functions (``inline=True``): a non-inlined ``cuda.jit(device=True)``
function makes ``compile_ptx`` initialise the CUDA driver, an inlined one does not. Warp shuffles
are avoided because the CUDA simulator does not provide them.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float64, int32, int64

from ._kernels import REDUCE, KernelTable, registry

GEMM = 16  # side of the output tiles and depth of the staged operand tiles of the similarity kernels
GEMM_STRIDE = GEMM + 1  # row stride of a staged tile in shared memory (avoids bank conflicts)
GEMM_SLAB = GEMM * GEMM_STRIDE  # a staged tile (shared-array sizes must be literal constants)
GEMM_SQUARE = GEMM * GEMM  # an output tile
TRANSPOSE = 32  # side of the shared tile that transposes the route keys
TRANSPOSE_SLAB = TRANSPOSE * (TRANSPOSE + 1)
RADIX_BITS = 8  # bits of the key resolved per pass of the radix select
RADIX = 1 << RADIX_BITS  # bins per pass; also the largest block of the radix-select kernel
RANK_THREADS = 256  # the largest route_rank_k block, so the longest row it ranks (one thread per token)
SCAN_SLAB = 2 * RADIX  # the ping-pong buffer of a block scan over up to RADIX threads
PARTIALS = 256  # the most blocks (partial sums) of the commitment-loss reduction
SENTINEL = -(1 << 63)  # route key of a padded token: below every real key, never a member
KEY_MAX = (1 << 63) - 1  # above every route key
PACK = 1 << 32  # packs two counts (each < 2**31) into one int64 for a single block scan


def build(dt: Any) -> KernelTable:
    """Every kernel of Routing steps 1-3, 7, 8 for the float type ``dt``: name -> (python function, signature spec)."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    wide = dt == float64
    # The IEEE layout of ``dt``, for the order keys: bits of the stored mantissa, the exponent bias
    # as frexp counts it (x = m 2^e, m in [0.5, 1), biased exponent e + EXP_BIAS), the smallest e of
    # a normal number, and 2^(MANT_BITS + 1) to turn m into an integer.
    MANT_BITS = 52 if wide else 23
    EXP_BIAS = 1022 if wide else 126
    MIN_NORMAL_EXP = -1021 if wide else -125
    MANT_SCALE = 1 << MANT_BITS
    M_TO_INT = dt(2.0 ** (MANT_BITS + 1))
    # A subnormal |x| is k 2^-(1074 | 149): k = |x| 2^1074 (2^149), in two exact steps that stay in range.
    SUB_A = dt(2.0 ** (537 if wide else 75))
    SUB_B = dt(2.0 ** (537 if wide else 74))
    KEY_BITS = 64 if wide else 32  # keys lie in (-2^(KEY_BITS-1), 2^(KEY_BITS-1))
    TOP = KEY_BITS - RADIX_BITS  # shift of the most significant digit
    HALF = RADIX // 2
    MASK = RADIX - 1
    kernels, kernel = registry()

    # ------------------------------------------------------------------ inline device functions

    @cuda.jit(device=True, inline=True)
    def tree_sum(buf, lane, lanes, stride, base, value):
        """Sum of ``value`` over ``lanes`` threads (a power of two) whose slots are buf[base + lane * stride].

        Returns the total to each of them. Every thread of the block must call it (barriers inside,
        none with one lane: ``lanes`` is a block dimension, so every thread takes the same branch).
        """
        if lanes == 1:
            return value
        buf[base + lane * stride] = value
        step = lanes // 2
        while step > 0:
            cuda.syncthreads()
            if lane < step:
                buf[base + lane * stride] += buf[base + (lane + step) * stride]
            step //= 2
        cuda.syncthreads()
        total = buf[base]
        cuda.syncthreads()  # the buffer may be refilled right after
        return total

    @cuda.jit(device=True, inline=True)
    def block_scan(buf, value):
        """(inclusive prefix sum of ``value`` over threadIdx.x, block total) for a 1-D block; ``buf``
        holds 2 * blockDim.x entries. Hillis-Steele, ping-ponging between the two halves of ``buf`` so
        that each step needs one barrier. Every thread of the block must call it."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        src = 0
        buf[tid] = value
        step = 1
        while step < threads:
            cuda.syncthreads()
            dst = threads - src
            buf[dst + tid] = buf[src + tid] + (buf[src + tid - step] if tid >= step else 0)
            src = dst
            step *= 2
        cuda.syncthreads()
        inclusive = buf[src + tid]
        total = buf[src + threads - 1]
        cuda.syncthreads()  # the buffer may be refilled right after
        return inclusive, total

    @cuda.jit(device=True, inline=True)
    def tile_dot(x_hat, centroids, b, h, t0, c0, xs, ms):
        """x_hat[b, h, t0 + ty] . centroids[h, c0 + tx] for the calling thread (0 outside the arrays).

        The block's blockDim.y token rows and blockDim.x centroid rows are staged GEMM features at a
        time, consecutive threads loading consecutive features. Every thread of the block must call it.
        """
        length, dim = x_hat.shape[2], x_hat.shape[3]
        clusters = centroids.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        tid = ty * cols + tx
        threads = cols * rows
        acc = ZERO
        for d0 in range(0, dim, GEMM):
            w = min(GEMM, dim - d0)
            cuda.syncthreads()
            for e in range(tid, rows * w, threads):
                t = t0 + e // w
                xs[(e // w) * GEMM_STRIDE + e % w] = x_hat[b, h, t, d0 + e % w] if t < length else ZERO
            for e in range(tid, cols * w, threads):
                c = c0 + e // w
                ms[(e // w) * GEMM_STRIDE + e % w] = centroids[h, c, d0 + e % w] if c < clusters else ZERO
            cuda.syncthreads()
            for j in range(w):
                acc += xs[ty * GEMM_STRIDE + j] * ms[tx * GEMM_STRIDE + j]
        return acc

    @cuda.jit(device=True, inline=True)
    def order_key(x):
        """An int64 whose order is the order of the float ``x`` (-0 and +0 equal): its IEEE magnitude
        bits, negated for negative x. Built from frexp, exactly, for normal and subnormal x."""
        if x == ZERO:
            return int64(0)
        magnitude = abs(x)
        m, e = math.frexp(magnitude)
        if e >= MIN_NORMAL_EXP:
            bits = int64(e + EXP_BIAS) * MANT_SCALE + int64(m * M_TO_INT) - MANT_SCALE
        else:
            bits = int64(magnitude * SUB_A * SUB_B)
        return bits if x > ZERO else -bits

    # ------------------------------------------------------------------ step 1: normalize

    @kernel("F4 i f F4")
    def normalize_k(x, layernorm, eps, out):
        """out = LN(x) (``layernorm``: (x - m) / sqrt(v + eps)) or x / max(||x||, eps), over the last axis.

        Rows are the (b, h, t) of x: blockDim.y rows per block, blockDim.x lanes (a power of two) per
        row striding over the features; the row sums are tree reductions over the lanes.
        """
        part = cuda.shared.array(REDUCE, dt)
        batch, heads, length, dim = x.shape
        lane, width = cuda.threadIdx.x, cuda.blockDim.x
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = row < batch * heads * length
        t = row % length
        h = (row // length) % heads
        b = row // (length * heads)
        first = cuda.threadIdx.y * width  # the row's first slot in ``part``
        acc = ZERO
        if layernorm:
            if active:
                for d in range(lane, dim, width):
                    acc += x[b, h, t, d]
            mean = tree_sum(part, lane, width, 1, first, acc) / dt(dim)
            acc = ZERO
            if active:
                for d in range(lane, dim, width):
                    centered = x[b, h, t, d] - mean
                    acc += centered * centered
            sigma = math.sqrt(tree_sum(part, lane, width, 1, first, acc) / dt(dim) + eps)
            if active:
                for d in range(lane, dim, width):
                    out[b, h, t, d] = (x[b, h, t, d] - mean) / sigma
        else:
            if active:
                for d in range(lane, dim, width):
                    acc += x[b, h, t, d] * x[b, h, t, d]
            scale = max(math.sqrt(tree_sum(part, lane, width, 1, first, acc)), eps)
            if active:
                for d in range(lane, dim, width):
                    out[b, h, t, d] = x[b, h, t, d] / scale

    @kernel("F4 F4 i f i F4 F4")
    def normalize_vjp_k(x, dy, layernorm, eps, has_base, base, dx):
        """dx = [base +] N'(x)ᵀ dy, N the normalization of :func:`normalize_k`; same layout.

        LayerNorm: N'(x)ᵀ dy = (dy - mean(dy) - y mean(dy y)) / sigma, y = (x - m) / sigma.
        L2: N'(x)ᵀ dy = (dy - y (y . dy)) / ||x||, y = x / ||x||; dy / eps where the clamp is active.
        ``base`` (read only when ``has_base``) adds the VJP to another gradient in the same pass.
        """
        part = cuda.shared.array(REDUCE, dt)
        batch, heads, length, dim = x.shape
        lane, width = cuda.threadIdx.x, cuda.blockDim.x
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = row < batch * heads * length
        t = row % length
        h = (row // length) % heads
        b = row // (length * heads)
        first = cuda.threadIdx.y * width  # the row's first slot in ``part``
        acc = ZERO
        if layernorm:
            if active:
                for d in range(lane, dim, width):
                    acc += x[b, h, t, d]
            mean = tree_sum(part, lane, width, 1, first, acc) / dt(dim)
            acc = ZERO
            if active:
                for d in range(lane, dim, width):
                    centered = x[b, h, t, d] - mean
                    acc += centered * centered
            sigma = math.sqrt(tree_sum(part, lane, width, 1, first, acc) / dt(dim) + eps)
            acc = ZERO
            acc_y = ZERO
            if active:
                for d in range(lane, dim, width):
                    g = dy[b, h, t, d]
                    acc += g
                    acc_y += g * ((x[b, h, t, d] - mean) / sigma)
            mean_dy = tree_sum(part, lane, width, 1, first, acc) / dt(dim)
            mean_dy_y = tree_sum(part, lane, width, 1, first, acc_y) / dt(dim)
            if active:
                for d in range(lane, dim, width):
                    y = (x[b, h, t, d] - mean) / sigma
                    g = (dy[b, h, t, d] - mean_dy - y * mean_dy_y) / sigma
                    dx[b, h, t, d] = g + base[b, h, t, d] if has_base else g
        else:
            if active:
                for d in range(lane, dim, width):
                    acc += x[b, h, t, d] * x[b, h, t, d]
            norm = math.sqrt(tree_sum(part, lane, width, 1, first, acc))
            clamped = norm <= eps
            safe = ONE if clamped else norm
            acc = ZERO
            if active:
                for d in range(lane, dim, width):
                    acc += (x[b, h, t, d] / safe) * dy[b, h, t, d]
            dot = tree_sum(part, lane, width, 1, first, acc)
            if active:
                for d in range(lane, dim, width):
                    if clamped:
                        g = dy[b, h, t, d] / eps
                    else:
                        g = (dy[b, h, t, d] - (x[b, h, t, d] / safe) * dot) / safe
                    dx[b, h, t, d] = g + base[b, h, t, d] if has_base else g

    # ------------------------------------------------------------------ step 2: similarity

    @kernel("F4 F3 F4")
    def similarity_k(x_hat, centroids, s):
        """s[b, h, t, c] = x_hat[b, h, t] . centroids[h, c]: a (blockDim.y tokens x blockDim.x centroids)
        tile per block, grid (C tiles, L tiles, B * H); consecutive threads write consecutive c."""
        xs = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        heads = x_hat.shape[1]
        b = cuda.blockIdx.z // heads
        h = cuda.blockIdx.z % heads
        t0 = cuda.blockIdx.y * cuda.blockDim.y
        c0 = cuda.blockIdx.x * cuda.blockDim.x
        acc = tile_dot(x_hat, centroids, b, h, t0, c0, xs, ms)
        t = t0 + cuda.threadIdx.y
        c = c0 + cuda.threadIdx.x
        if t < s.shape[2] and c < s.shape[3]:
            s[b, h, t, c] = acc

    @kernel("F4 F3 F4")
    def similarity_dx_k(ds, centroids, dx):
        """dx[b, h, t, d] = sum_c ds[b, h, t, c] centroids[h, c, d]: a (blockDim.y tokens x blockDim.x
        features) tile per block, grid (D tiles, L tiles, B * H), ds and centroid tiles staged over c."""
        dss = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        batch, heads, length, clusters = ds.shape
        dim = centroids.shape[2]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        tid = ty * cols + tx
        threads = cols * rows
        b = cuda.blockIdx.z // heads
        h = cuda.blockIdx.z % heads
        t0 = cuda.blockIdx.y * rows
        d0 = cuda.blockIdx.x * cols
        acc = ZERO
        for c0 in range(0, clusters, GEMM):
            w = min(GEMM, clusters - c0)
            cuda.syncthreads()
            for e in range(tid, rows * w, threads):
                t = t0 + e // w
                dss[(e // w) * GEMM_STRIDE + e % w] = ds[b, h, t, c0 + e % w] if t < length else ZERO
            for e in range(tid, w * cols, threads):
                d = d0 + e % cols
                ms[(e // cols) * GEMM_STRIDE + e % cols] = centroids[h, c0 + e // cols, d] if d < dim else ZERO
            cuda.syncthreads()
            for j in range(w):
                acc += dss[ty * GEMM_STRIDE + j] * ms[j * GEMM_STRIDE + tx]
        t = t0 + ty
        d = d0 + tx
        if t < length and d < dim:
            dx[b, h, t, d] = acc

    @kernel("F4 F4 F4")
    def similarity_dmu_k(ds, x_hat, partial):
        """partial[b, h, c, d] = sum_t ds[b, h, t, c] x_hat[b, h, t, d]: a (blockDim.y centroids x
        blockDim.x features) tile per block, grid (D tiles, C tiles, B * H), staged over t. The
        batch is summed by :func:`sum_over_batch_k` (split over b for parallelism, deterministic)."""
        dss = cuda.shared.array(GEMM_SLAB, dt)
        xs = cuda.shared.array(GEMM_SLAB, dt)
        batch, heads, length, clusters = ds.shape
        dim = x_hat.shape[3]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        tid = ty * cols + tx
        threads = cols * rows
        b = cuda.blockIdx.z // heads
        h = cuda.blockIdx.z % heads
        c0 = cuda.blockIdx.y * rows
        d0 = cuda.blockIdx.x * cols
        acc = ZERO
        for n0 in range(0, length, GEMM):
            w = min(GEMM, length - n0)
            cuda.syncthreads()
            for e in range(tid, w * rows, threads):
                c = c0 + e % rows
                dss[(e // rows) * GEMM_STRIDE + e % rows] = ds[b, h, n0 + e // rows, c] if c < clusters else ZERO
            for e in range(tid, w * cols, threads):
                d = d0 + e % cols
                xs[(e // cols) * GEMM_STRIDE + e % cols] = x_hat[b, h, n0 + e // cols, d] if d < dim else ZERO
            cuda.syncthreads()
            for j in range(w):
                acc += dss[j * GEMM_STRIDE + ty] * xs[j * GEMM_STRIDE + tx]
        c = c0 + ty
        d = d0 + tx
        if c < clusters and d < dim:
            partial[b, h, c, d] = acc

    @kernel("F4 F3")
    def sum_over_batch_k(partial, total):
        """total[h, c, d] = sum_b partial[b, h, c, d]; one thread per (h, c, d), consecutive in d."""
        idx = cuda.grid(1)
        batch, heads, clusters, dim = partial.shape
        if idx >= heads * clusters * dim:
            return
        d = idx % dim
        c = (idx // dim) % clusters
        h = idx // (dim * clusters)
        acc = ZERO
        for b in range(batch):
            acc += partial[b, h, c, d]
        total[h, c, d] = acc

    # ------------------------------------------------------------------ step 3: route

    @kernel("F4 I2 I4")
    def route_keys_k(s, padded, keys):
        """keys[b, h, c, t] = order key of s[b, h, t, c], SENTINEL where padded[b, t].

        A TRANSPOSE x TRANSPOSE tile per block, grid (C tiles, L tiles, B * H): read with consecutive
        threads on consecutive c, written transposed with consecutive threads on consecutive t.
        """
        tile = cuda.shared.array(TRANSPOSE_SLAB, int64)
        batch, heads, length, clusters = s.shape
        b = cuda.blockIdx.z // heads
        h = cuda.blockIdx.z % heads
        c0 = cuda.blockIdx.x * TRANSPOSE
        t0 = cuda.blockIdx.y * TRANSPOSE
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        for r in range(ty, TRANSPOSE, rows):
            t = t0 + r
            for j in range(tx, TRANSPOSE, cols):
                c = c0 + j
                if t < length and c < clusters:
                    tile[j * (TRANSPOSE + 1) + r] = SENTINEL if padded[b, t] != 0 else order_key(s[b, h, t, c])
        cuda.syncthreads()
        for r in range(ty, TRANSPOSE, rows):
            c = c0 + r
            for j in range(tx, TRANSPOSE, cols):
                t = t0 + j
                if c < clusters and t < length:
                    keys[b, h, c, t] = tile[r * (TRANSPOSE + 1) + j]

    @kernel("F4 I2 i I4")
    def route_rank_k(s, padded, window, members):
        """members[b, h, c] = the ``window`` unpadded positions t with the largest s[b, h, t, c] (ties:
        lower position first), in increasing position, -1 in the slots left when fewer are unpadded;
        for rows of L <= blockDim.x tokens, blockDim.x * blockDim.y <= RANK_THREADS.

        blockDim.y rows (b, h, c) per block (grid B * H * C / blockDim.y), thread (t, y) owns token t
        of row y. With key_t the order key of s[b, h, t, c] (SENTINEL where padded[b, t], below every
        real key), its rank

            rank_t = #{u : key_u > key_t  or  (key_u == key_t and u < t)}

        is t's place in the order "larger first, lower position first among equals", so the members
        are the unpadded t with rank_t < W, and each writes itself to slot #{taken u < t}. Each score
        is read once (no key array, no transpose); the O(L) loops read shared memory, all the threads
        of a row at one address at a time (a broadcast). Two barriers.
        """
        keys = cuda.shared.array(RANK_THREADS, int64)
        taken = cuda.shared.array(RANK_THREADS, int32)
        batch, heads, length, clusters = s.shape
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = row < batch * heads * clusters
        c = row % clusters
        h = (row // clusters) % heads
        b = row // (clusters * heads)
        t = cuda.threadIdx.x
        first = cuda.threadIdx.y * cuda.blockDim.x  # the row's first slot in ``keys`` and ``taken``
        key = SENTINEL
        if active and t < length and padded[b, t] == 0:
            key = order_key(s[b, h, t, c])
        keys[first + t] = key
        cuda.syncthreads()
        rank = 0
        unpadded = 0
        for u in range(length):
            other = keys[first + u]
            if other != SENTINEL:
                unpadded += 1
                if other > key or (other == key and u < t):
                    rank += 1
        mine = key != SENTINEL and rank < window
        taken[first + t] = 1 if mine else 0
        cuda.syncthreads()
        if mine:
            slot = 0
            for u in range(t):
                slot += taken[first + u]
            members[b, h, c, slot] = t
        if active:
            for slot in range(min(unpadded, window) + t, window, cuda.blockDim.x):
                members[b, h, c, slot] = -1

    @kernel("I4 i I4")
    def route_radix_k(keys, window, members):
        """members[b, h, c] = the ``window`` unpadded positions with the largest keys[b, h, c, :] (ties:
        lower position first), in increasing position; -1 in the slots left when fewer are unpadded.
        For rows of any length (the host sends it those longer than RANK_THREADS).

        One block per (b, h, c) row (grid B * H * C), blockDim.x a power of two <= RADIX.
        Select: per pass, a shared histogram of the next RADIX_BITS-bit digit of the keys that share
        the digits found so far (``prefix``), then a block scan over the bins from the top finds the bin
        holding the ``need``-th largest. The passes stop when that bin is taken whole, when the key is
        exact (the last digit, or every key still matching is the same key: exact ties), or at once when
        at most W tokens are unpadded. Then every key whose high part (key >> shift) exceeds ``prefix``
        is taken, and the first ``need`` (by position) of those equal to it; one packed block scan per
        chunk of positions gives each taken token its slot.
        """
        hist = cuda.shared.array(RADIX, int32)
        buf = cuda.shared.array(SCAN_SLAB, int64)
        found = cuda.shared.array(6, int64)  # digit, need, count of the boundary bin; min, max, number matching
        batch, heads, clusters, length = keys.shape
        row = cuda.blockIdx.x
        c = row % clusters
        h = (row // clusters) % heads
        b = row // (clusters * heads)
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        per = RADIX // threads  # bins per thread in the bin scan, highest first
        shift = TOP
        prefix = int64(0)
        need = int64(window)
        take_all = False
        while True:
            for i in range(tid, RADIX, threads):
                hist[i] = 0
            if tid == 0:
                found[3] = KEY_MAX
                found[4] = SENTINEL
                found[5] = 0
            cuda.syncthreads()
            low = KEY_MAX
            high = SENTINEL
            matching = 0
            for t in range(tid, length, threads):
                key = keys[b, h, c, t]
                if key != SENTINEL and (shift == TOP or (key >> (shift + RADIX_BITS)) == prefix):
                    cuda.atomic.add(hist, ((key >> TOP) + HALF) if shift == TOP else ((key >> shift) & MASK), 1)
                    low = min(low, key)
                    high = max(high, key)
                    matching += 1
            if matching > 0:  # one atomic per thread, after its own reduction
                cuda.atomic.min(found, 3, low)
                cuda.atomic.max(found, 4, high)
                cuda.atomic.add(found, 5, matching)
            cuda.syncthreads()
            if shift == TOP and found[5] <= window:  # at most W unpadded tokens: all of them are members
                take_all = True
                break
            if found[3] == found[4]:  # the keys still matching are all one key: the boundary key
                prefix = found[3]
                shift = 0
                break
            mine = int64(0)
            for j in range(per):
                mine += hist[RADIX - 1 - tid * per - j]
            inclusive, _ = block_scan(buf, mine)
            running = inclusive - mine  # matching keys in the bins above this thread's
            for j in range(per):
                digit = RADIX - 1 - tid * per - j
                count = hist[digit]
                if running < need and need <= running + count:
                    found[0] = digit
                    found[1] = need - running
                    found[2] = count
                running += count
            cuda.syncthreads()
            digit = found[0]
            need = found[1]
            count = found[2]
            prefix = digit - HALF if shift == TOP else prefix * RADIX + digit
            if count == need or shift == 0:
                break
            shift -= RADIX_BITS
        above_seen = int64(0)
        tied_seen = int64(0)
        for start in range(0, length, threads):
            t = start + tid
            above = 0
            tied = 0
            if t < length:
                key = keys[b, h, c, t]
                if key != SENTINEL:
                    if take_all or (key >> shift) > prefix:
                        above = 1
                    elif (key >> shift) == prefix:
                        tied = 1
            packed = above * PACK + tied
            inclusive, total = block_scan(buf, packed)
            before = inclusive - packed
            tied_before = tied_seen + before % PACK
            if above == 1 or (tied == 1 and tied_before < need):
                members[b, h, c, above_seen + before // PACK + min(tied_before, need)] = t
            above_seen += total // PACK
            tied_seen += total % PACK
        taken = above_seen + (0 if take_all else min(tied_seen, need))
        for slot in range(taken + tid, window, threads):
            members[b, h, c, slot] = -1

    # ------------------------------------------------------------------ step 7: assign, centroid update

    @kernel("F4 F3 I2 I3")
    def assign_k(x_hat, centroids, padded, labels):
        """labels[b, h, t] = argmax_c x_hat[b, h, t] . centroids[h, c] (first maximum), -1 where padded.

        blockDim.y tokens per block (grid L tiles, B * H); the block sweeps the centroids in tiles of
        blockDim.x with :func:`tile_dot`, and thread x = 0 of each token row keeps the running best.
        """
        xs = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        dots = cuda.shared.array(GEMM_SQUARE, dt)
        batch, heads, length, dim = x_hat.shape
        clusters = centroids.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols = cuda.blockDim.x
        b = cuda.blockIdx.y // heads
        h = cuda.blockIdx.y % heads
        t0 = cuda.blockIdx.x * cuda.blockDim.y
        best = NEG_INF
        best_c = -1
        for c0 in range(0, clusters, cols):
            dots[ty * GEMM + tx] = tile_dot(x_hat, centroids, b, h, t0, c0, xs, ms)
            cuda.syncthreads()
            if tx == 0:
                for j in range(min(cols, clusters - c0)):
                    value = dots[ty * GEMM + j]
                    if best_c < 0 or value > best:  # strict: ties keep the lower index
                        best = value
                        best_c = c0 + j
            # tile_dot opens with a barrier, so dots is not overwritten before it has been read
        t = t0 + ty
        if tx == 0 and t < length:
            labels[b, h, t] = -1 if padded[b, t] != 0 else best_c

    @kernel("F4 I3 i F2 F3")
    def centroid_stats_k(x_hat, labels, accumulate, counts, sums):
        """N[h, c] = #{(b, t): labels = c}, S[h, c] = sum of those x_hat rows; written to counts and
        sums, or added to them when ``accumulate``. One block per (c, h) (grid (C, H)): blockDim.x lanes
        on consecutive features, blockDim.y (a power of two) token rows over all (b, t); a segmented
        reduction, deterministic."""
        part = cuda.shared.array(REDUCE, dt)
        tally = cuda.shared.array(REDUCE, int64)
        batch, heads, length, dim = x_hat.shape
        c = cuda.blockIdx.x
        h = cuda.blockIdx.y
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        for d0 in range(0, dim, cols):
            d = d0 + tx
            acc = ZERO
            members = 0
            for e in range(ty, batch * length, rows):
                b = e // length
                t = e % length
                if labels[b, h, t] == c:
                    members += 1
                    if d < dim:
                        acc += x_hat[b, h, t, d]
            total = tree_sum(part, ty, rows, cols, tx, acc)
            if ty == 0 and d < dim:
                sums[h, c, d] = (sums[h, c, d] + total) if accumulate else total
            if d0 == 0:
                number = tree_sum(tally, ty, rows, cols, tx, members)
                if ty == 0 and tx == 0:
                    counts[h, c] = (counts[h, c] + dt(number)) if accumulate else dt(number)

    @kernel("F2 F3 F2 F3 f f F2 F3")
    def centroid_ema_k(counts, sums, batch_counts, batch_sums, keep, rate, new_counts, new_sums):
        """new = keep * old + rate * batch for the counts (H, C) and sums (H, C, D); one thread per (h, c, d).

        ``new`` may be ``old`` (each element is read before it is written by the same thread).
        """
        idx = cuda.grid(1)
        heads, clusters, dim = sums.shape
        if idx >= heads * clusters * dim:
            return
        d = idx % dim
        c = (idx // dim) % clusters
        h = idx // (dim * clusters)
        new_sums[h, c, d] = keep * sums[h, c, d] + rate * batch_sums[h, c, d]
        if d == 0:
            new_counts[h, c] = keep * counts[h, c] + rate * batch_counts[h, c]

    @kernel("F2 F3 F3 f F3")
    def vqvae_means_k(counts, sums, means, laplace_eps, out):
        """tacl means: with n = sum_c counts[h, c] and Ñ_c = (counts_c + eps) / (n + C eps) * n,
        out[h, c] = sums[h, c] / Ñ_c, or means[h, c] where n <= 0. One block per head (blockDim.x a
        power of two): n by a tree reduction, then the (c, d) entries with consecutive threads on d."""
        part = cuda.shared.array(REDUCE, dt)
        heads, clusters, dim = sums.shape
        h = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        acc = ZERO
        for c in range(tid, clusters, threads):
            acc += counts[h, c]
        total = tree_sum(part, tid, threads, 1, 0, acc)
        for e in range(tid, clusters * dim, threads):
            c = e // dim
            d = e % dim
            if total > ZERO:
                smoothed = (counts[h, c] + laplace_eps) / (total + dt(clusters) * laplace_eps) * total
                out[h, c, d] = sums[h, c, d] / (smoothed if smoothed > ZERO else ONE)
            else:
                out[h, c, d] = means[h, c, d]

    @kernel("F3 F2 F3 F2 F3 f f F3 F2 F3")
    def spherical_update_k(means, counts, sums, batch_counts, unit, keep, rate, new_means, new_counts, new_sums):
        """lucidrains: new_means = keep * means + rate * (unit if batch_counts > 0 else means), ``unit``
        the L2-normalized batch sums; counts and sums copied unchanged. One thread per (h, c, d)."""
        idx = cuda.grid(1)
        heads, clusters, dim = means.shape
        if idx >= heads * clusters * dim:
            return
        d = idx % dim
        c = (idx // dim) % clusters
        h = idx // (dim * clusters)
        old = means[h, c, d]
        target = unit[h, c, d] if batch_counts[h, c] > ZERO else old
        new_means[h, c, d] = keep * old + rate * target
        new_sums[h, c, d] = sums[h, c, d]
        if d == 0:
            new_counts[h, c] = counts[h, c]

    # ------------------------------------------------------------------ step 8: commitment loss

    @kernel("F4 F3 I3 F1")
    def commitment_partial_k(x_hat, centroids, labels, partial):
        """partial[block] = sum of (x_hat - centroids[h, label])^2 over this block's grid-stride share of
        the (b, h, t, d) elements with label >= 0 (consecutive threads on consecutive d); a tree
        reduction per block. The grid size depends only on the shape, so the sum is deterministic."""
        part = cuda.shared.array(REDUCE, dt)
        batch, heads, length, dim = x_hat.shape
        acc = ZERO
        for e in range(cuda.grid(1), batch * heads * length * dim, cuda.gridsize(1)):
            d = e % dim
            t = (e // dim) % length
            h = (e // (dim * length)) % heads
            b = e // (dim * length * heads)
            a = labels[b, h, t]
            if a >= 0:
                r = x_hat[b, h, t, d] - centroids[h, a, d]
                acc += r * r
        total = tree_sum(part, cuda.threadIdx.x, cuda.blockDim.x, 1, 0, acc)
        if cuda.threadIdx.x == 0:
            partial[cuda.blockIdx.x] = total

    @kernel("F1 F1")
    def sum_all_k(values, total):
        """total[0] = sum of values: one block (blockDim.x a power of two), strided loads, a tree reduction."""
        part = cuda.shared.array(REDUCE, dt)
        acc = ZERO
        for i in range(cuda.threadIdx.x, values.shape[0], cuda.blockDim.x):
            acc += values[i]
        result = tree_sum(part, cuda.threadIdx.x, cuda.blockDim.x, 1, 0, acc)
        if cuda.threadIdx.x == 0:
            total[0] = result

    @kernel("F4 F3 I3 f F4")
    def commitment_vjp_k(x_hat, centroids, labels, factor, dx):
        """dx = factor (x_hat - centroids[h, label]) where label >= 0, 0 at padding; one thread per element."""
        idx = cuda.grid(1)
        batch, heads, length, dim = x_hat.shape
        if idx >= batch * heads * length * dim:
            return
        d = idx % dim
        t = (idx // dim) % length
        h = (idx // (dim * length)) % heads
        b = idx // (dim * length * heads)
        a = labels[b, h, t]
        dx[b, h, t, d] = factor * (x_hat[b, h, t, d] - centroids[h, a, d]) if a >= 0 else ZERO

    return kernels
