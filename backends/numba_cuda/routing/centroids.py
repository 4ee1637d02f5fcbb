"""Routing step 7 on the device (:mod:`refattn.routing.centroids`, whose checks it runs).

How it differs from the reference: ``assign`` runs the similarity's tiles over all centroids keeping
a running argmax per token (ties to the lower index, as ``argmax``); the per-cluster counts and sums
of the update are segmented reductions, one block per (c, h), with no atomics (deterministic), then
elementwise EMA kernels; the tacl means with one block per head. ``init_centroids`` is the
reference's (host NumPy, the caller's generator): spec/interface.md exempts it from comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, int64

from refattn.routing.centroids import OVERFLOWS, CentroidState, check_assign, check_update_centroids, init_centroids
from refattn.routing.profiles import Profile

from .. import device
from ..device import GEMM, GEMM_SLAB, GEMM_SQUARE, unravel3
from ..kernels import KernelTable, registry
from ..runtime import REDUCE, ROW_LANES, Call, intake
from .normalize import normalize_core
from .route import padding_flags
from .similarity import heads_first

__all__ = ["CentroidState", "assign", "init_centroids", "update_centroids", "assign_core", "update_centroids_core"]

THREAD_ITEMS = 16  # tokens a thread of the statistics adds on its own before the tree


def assign_core(call: Call, x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> Any:
    """labels (B, H, L) int64 on the device; -1 at padding."""
    batch, heads, length, _ = x_hat.shape
    padded = padding_flags(call, key_padding_mask, batch, length)
    cols, rows = min(GEMM, centroids.shape[1]), min(GEMM, length)
    labels = call.empty((batch, heads, length), np.int64)
    call.launch("assign_k", -(-length // rows) * batch * heads, (cols, rows), x_hat, heads_first(centroids), padded,
                labels)
    return labels


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.routing.assign` on the device."""
    call, (x_hat, centroids, key_padding_mask) = intake(check_assign, x_hat, centroids, key_padding_mask)
    return call.out(assign_core(call, x_hat, centroids, key_padding_mask=key_padding_mask))


def statistics(call: Call, x_hat: Any, means: Any, mask: Any, counts: Any, sums: Any, accumulate: bool) -> None:
    """N (H, C) and S (H, C, D) of the tokens nearest each centroid, written to (or added to) counts, sums."""
    batch, heads, length, dim = x_hat.shape
    labels = assign_core(call, x_hat, means, key_padding_mask=mask)
    lanes = min(ROW_LANES, 1 << max(0, (dim - 1).bit_length()))
    # token rows: a power of two, each adding about THREAD_ITEMS tokens before their tree
    rows = min(REDUCE // lanes, 1 << max(0, (-(-batch * length // THREAD_ITEMS) - 1).bit_length()))
    call.launch("centroid_stats_k", means.shape[1] * heads, (lanes, rows), x_hat, labels, int(accumulate), counts,
                sums)


def update_centroids_core(call: Call, state: CentroidState, q_hat: Any, k_hat: Any = None, *, profile: Profile,
                          key_padding_mask: Any = None, decay: float = 0.999) -> CentroidState:
    """The new :class:`CentroidState` on the device."""
    means, counts, sums = state
    heads, clusters, dim = means.shape
    inputs = [x for x in (q_hat, k_hat) if x is not None]
    keep, rate = call.scalar(decay), call.scalar(1.0 - decay)
    batch_counts = call.empty((heads, clusters))
    batch_sums = call.empty((heads, clusters, dim))
    new_means = call.empty((heads, clusters, dim))
    new_counts = call.empty((heads, clusters))
    new_sums = call.empty((heads, clusters, dim))
    if profile.update == "vqvae_ema":
        for x in inputs:  # the queries' EMA step, then the keys' (both assigned under the incoming means)
            statistics(call, x, means, key_padding_mask, batch_counts, batch_sums, accumulate=False)
            call.flat("centroid_ema_k", new_sums.size, counts, sums, batch_counts, batch_sums, keep, rate, new_counts,
                      new_sums)
            counts, sums = new_counts, new_sums
        threads = min(REDUCE, 1 << max(0, (clusters * dim - 1).bit_length()))
        call.launch("vqvae_means_k", heads, threads, new_counts, new_sums, means, call.scalar(profile.laplace_eps),
                    new_means)
    else:
        for position, x in enumerate(inputs):  # lucidrains pools the queries and keys
            statistics(call, x, means, key_padding_mask, batch_counts, batch_sums, accumulate=position > 0)
        unit = normalize_core(call, batch_sums, profile=profile)
        call.flat("spherical_update_k", new_means.size, means, counts, sums, batch_counts, unit, keep, rate,
                  new_means, new_counts, new_sums)
    return CentroidState(new_means, new_counts, new_sums)


def update_centroids(state: CentroidState, q_hat: Any, k_hat: Any = None, *, profile: str = "tacl",
                     key_padding_mask: Any = None, decay: float = 0.999) -> CentroidState:
    """:func:`refattn.routing.update_centroids` on the device."""
    call, (state, q_hat, k_hat, profile, key_padding_mask, decay) = intake(
        check_update_centroids, state, q_hat, k_hat, profile, key_padding_mask, decay)
    new = update_centroids_core(call, state, q_hat, k_hat, profile=profile, key_padding_mask=key_padding_mask,
                                decay=decay)
    call.watch_rules(tuple(new), OVERFLOWS["update_centroids"], q_hat=q_hat, k_hat=k_hat)
    return CentroidState(*call.out(*new))


def kernels(dt: Any) -> KernelTable:
    """The assignment and centroid-update kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-float("inf"))
    size = dt.bitwidth // 8
    fn = device.functions(dt)
    gemm, tree_sum = fn.gemm, fn.tree_sum
    table, kernel = registry()

    @kernel("F4 F4 I2 I3", shared=(2 * GEMM_SLAB + GEMM_SQUARE) * size)
    def assign_k(x_hat, centroids, padded, labels):
        """labels[b, h, t] = argmax_c x_hat[b, h, t] . centroids[0, h, c] (first maximum), -1 where padded.

        blockDim.y tokens per block (blocks: L tiles fastest, then b * H + h); the block sweeps the
        centroids in tiles of blockDim.x (``gemm``), and thread x = 0 of each token row keeps the
        running best.
        """
        xs = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        dots = cuda.shared.array(GEMM_SQUARE, dt)
        batch, heads, length, dim = x_hat.shape
        clusters = centroids.shape[2]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols = cuda.blockDim.x
        tiles = (length + cuda.blockDim.y - 1) // cuda.blockDim.y
        bh = cuda.blockIdx.x // tiles
        b = bh // heads
        h = bh - b * heads
        t0 = (cuda.blockIdx.x - bh * tiles) * cuda.blockDim.y
        best = NEG_INF
        best_c = -1
        for c0 in range(0, clusters, cols):
            dots[ty * GEMM + tx] = gemm(x_hat, b, t0, 0, False, centroids, 0, c0, 0, True, h, dim, xs, ms)
            cuda.syncthreads()
            if tx == 0:
                for j in range(min(cols, clusters - c0)):
                    value = dots[ty * GEMM + j]
                    if best_c < 0 or value > best:  # strict: ties keep the lower index
                        best = value
                        best_c = c0 + j
            # gemm opens with a barrier, so dots is not overwritten before it has been read
        t = t0 + ty
        if tx == 0 and t < length:
            labels[b, h, t] = -1 if padded[b, t] != 0 else best_c

    @kernel("F4 I3 i F2 F3", shared=REDUCE * (size + 8))
    def centroid_stats_k(x_hat, labels, accumulate, counts, sums):
        """N[h, c] = #{(b, t): labels = c}, S[h, c] = sum of those x_hat rows; written to counts and
        sums, or added to them when ``accumulate``. One block per (c, h) (c fastest): blockDim.x lanes
        on consecutive features, blockDim.y (a power of two) token rows over all (b, t); a segmented
        reduction, deterministic."""
        part = cuda.shared.array(REDUCE, dt)
        tally = cuda.shared.array(REDUCE, int64)
        batch, heads, length, dim = x_hat.shape
        c = cuda.blockIdx.x % counts.shape[1]
        h = cuda.blockIdx.x // counts.shape[1]
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
        if idx >= sums.size:
            return
        h, c, d = unravel3(idx, sums.shape[1], sums.shape[2])
        new_sums[h, c, d] = keep * sums[h, c, d] + rate * batch_sums[h, c, d]
        if d == 0:
            new_counts[h, c] = keep * counts[h, c] + rate * batch_counts[h, c]

    @kernel("F2 F3 F3 f F3", shared=REDUCE * size)
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
        if idx >= means.size:
            return
        h, c, d = unravel3(idx, means.shape[1], means.shape[2])
        old = means[h, c, d]
        target = unit[h, c, d] if batch_counts[h, c] > ZERO else old
        new_means[h, c, d] = keep * old + rate * target
        new_sums[h, c, d] = sums[h, c, d]
        if d == 0:
            new_counts[h, c] = counts[h, c]

    return table
