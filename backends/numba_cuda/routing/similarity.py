"""Routing step 2 on the device (:mod:`refattn.routing.similarity`, whose checks it runs).

How it differs from the reference: the products are tiled GEMMs, a GEMM x GEMM output tile per
block with both operands staged in shared memory (row stride GEMM + 1: conflict-free) by coalesced
loads; the blocks run over (tiles of one axis, tiles of the other, b * H + h) flattened into grid.x,
so no grid axis limits L or B * H. dμ is summed over t per (b, h), then over b (deterministic).
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from refattn.routing.similarity import OVERFLOWS, check_similarity, check_similarity_vjp

from .. import device
from ..device import GEMM, GEMM_SLAB
from ..kernels import KernelTable, registry
from ..runtime import Call, intake

__all__ = ["similarity", "similarity_vjp", "similarity_core", "similarity_vjp_core", "gemm_launch", "heads_first"]


def gemm_launch(columns: int, rows: int, batch_heads: int) -> tuple[int, tuple[int, int]]:
    """(blocks, (threads along the columns, along the rows)) of a tiled product over (rows, columns) outputs
    per (b, h): blocks = column tiles x row tiles x B * H."""
    cols, lines = min(GEMM, columns), min(GEMM, rows)
    return -(-columns // cols) * -(-rows // lines) * batch_heads, (cols, lines)


def heads_first(centroids: Any) -> Any:
    """The (H, C, D) centroids as a (1, H, C, D) view: the kernels' operands are all (B, H, ·, ·)."""
    return centroids.reshape(1, *tuple(centroids.shape))


def similarity_core(call: Call, x_hat: Any, centroids: Any) -> Any:
    """S (B, H, L, C) of device arrays."""
    batch, heads, length, _ = x_hat.shape
    clusters = centroids.shape[1]
    s = call.empty((batch, heads, length, clusters))
    call.launch("similarity_k", *gemm_launch(clusters, length, batch * heads), x_hat, heads_first(centroids), s)
    return s


def similarity(x_hat: Any, centroids: Any) -> Any:
    """:func:`refattn.routing.similarity` on the device."""
    call, (x_hat, centroids) = intake(check_similarity, x_hat, centroids)
    s = similarity_core(call, x_hat, centroids)
    call.watch_rules(s, OVERFLOWS["similarity"], x_hat=x_hat, centroids=centroids)
    return call.out(s)


def similarity_vjp_core(call: Call, x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any]:
    """(dx_hat (B, H, L, D), dcentroids (H, C, D)) of device arrays."""
    batch, heads, length, dim = x_hat.shape
    clusters = centroids.shape[1]
    dx = call.empty(x_hat.shape)
    call.launch("similarity_dx_k", *gemm_launch(dim, length, batch * heads), ds, heads_first(centroids), dx)
    partial = call.empty((batch, heads, clusters, dim))
    call.launch("similarity_dmu_k", *gemm_launch(dim, clusters, batch * heads), ds, x_hat, partial)
    dmu = call.empty((heads, clusters, dim))
    call.flat("sum_over_batch_k", dmu.size, partial, dmu)
    return dx, dmu


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any]:
    """:func:`refattn.routing.similarity_vjp` on the device."""
    call, (x_hat, centroids, ds) = intake(check_similarity_vjp, x_hat, centroids, ds)
    dx, dmu = similarity_vjp_core(call, x_hat, centroids, ds)
    call.watch_rules((dx, dmu), OVERFLOWS["similarity_vjp"], x_hat=x_hat, centroids=centroids, ds=ds)
    return call.out(dx, dmu)


def kernels(dt: Any) -> KernelTable:
    """The similarity kernels for the float type ``dt``."""
    ZERO, size, gemm = dt(0.0), dt.bitwidth // 8, device.functions(dt).gemm
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def output_tile(columns, rows, heads):
        """(b, h, first row, first column) of this block's output tile (blocks: column tiles fastest)."""
        col_tiles = (columns + cuda.blockDim.x - 1) // cuda.blockDim.x
        tiles = col_tiles * ((rows + cuda.blockDim.y - 1) // cuda.blockDim.y)
        bh = cuda.blockIdx.x // tiles
        tile = cuda.blockIdx.x - bh * tiles
        line = tile // col_tiles
        return bh // heads, bh % heads, line * cuda.blockDim.y, (tile - line * col_tiles) * cuda.blockDim.x

    @kernel("F4 F4 F4", shared=2 * GEMM_SLAB * size)
    def similarity_k(x_hat, centroids, s):
        """s[b, h, t, c] = x_hat[b, h, t] . centroids[0, h, c]: a (blockDim.y tokens x blockDim.x centroids) tile
        per block; consecutive threads write consecutive c."""
        xs = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        b, h, t0, c0 = output_tile(s.shape[3], s.shape[2], s.shape[1])
        acc = gemm(x_hat, b, t0, 0, False, centroids, 0, c0, 0, True, h, x_hat.shape[3], xs, ms)
        if t0 + cuda.threadIdx.y < s.shape[2] and c0 + cuda.threadIdx.x < s.shape[3]:
            s[b, h, t0 + cuda.threadIdx.y, c0 + cuda.threadIdx.x] = acc

    @kernel("F4 F4 F4", shared=2 * GEMM_SLAB * size)
    def similarity_dx_k(ds, centroids, dx):
        """dx[b, h, t, d] = sum_c ds[b, h, t, c] centroids[0, h, c, d]: a (blockDim.y tokens x blockDim.x features)
        tile per block."""
        dss = cuda.shared.array(GEMM_SLAB, dt)
        ms = cuda.shared.array(GEMM_SLAB, dt)
        b, h, t0, d0 = output_tile(dx.shape[3], dx.shape[2], dx.shape[1])
        acc = gemm(ds, b, t0, 0, False, centroids, 0, 0, d0, False, h, ds.shape[3], dss, ms)
        if t0 + cuda.threadIdx.y < dx.shape[2] and d0 + cuda.threadIdx.x < dx.shape[3]:
            dx[b, h, t0 + cuda.threadIdx.y, d0 + cuda.threadIdx.x] = acc

    @kernel("F4 F4 F4", shared=2 * GEMM_SLAB * size)
    def similarity_dmu_k(ds, x_hat, partial):
        """partial[b, h, c, d] = sum_t ds[b, h, t, c] x_hat[b, h, t, d]: a (blockDim.y centroids x blockDim.x
        features) tile per block. The batch is summed by :func:`sum_over_batch_k`."""
        dss = cuda.shared.array(GEMM_SLAB, dt)
        xs = cuda.shared.array(GEMM_SLAB, dt)
        b, h, c0, d0 = output_tile(partial.shape[3], partial.shape[2], partial.shape[1])
        acc = gemm(ds, b, 0, c0, True, x_hat, b, 0, d0, False, h, ds.shape[2], dss, xs)
        if c0 + cuda.threadIdx.y < partial.shape[2] and d0 + cuda.threadIdx.x < partial.shape[3]:
            partial[b, h, c0 + cuda.threadIdx.y, d0 + cuda.threadIdx.x] = acc

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

    return table
