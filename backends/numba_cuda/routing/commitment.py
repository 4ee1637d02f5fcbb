"""Routing step 8 on the device (:mod:`refattn.routing.commitment`, whose checks it runs).

How it differs from the reference: the squared residuals are summed by a grid-stride tree reduction
per block over a grid that depends on the shape only (deterministic) and one more block over the
partial sums; only the total comes back (reading it synchronises with the device).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from refattn.routing.commitment import OVERFLOWS, check_commitment_loss, check_commitment_loss_vjp

from .. import device
from ..device import unravel4
from ..kernels import KernelTable, registry
from ..runtime import REDUCE, Call, intake
from .centroids import assign_core

__all__ = ["commitment_loss", "commitment_loss_vjp", "commitment_loss_core", "commitment_loss_vjp_core"]

PARTIALS = 256  # the most blocks (partial sums) of the loss's reduction
THREAD_ITEMS = 16  # elements a thread adds on its own before the tree


def unpadded_elements(x_hat: Any, mask: np.ndarray | None) -> int:
    """N D: the elements of the unpadded (b, h, t)."""
    batch, heads, length, dim = x_hat.shape
    return heads * (batch * length - (0 if mask is None else int(mask.sum()))) * dim


def commitment_loss_core(call: Call, x_hat: Any, centroids: Any, *, beta: float = 1e-4,
                         key_padding_mask: Any = None) -> Any:
    """The loss as a (1,) device array."""
    count = unpadded_elements(x_hat, key_padding_mask)
    labels = assign_core(call, x_hat, centroids, key_padding_mask=key_padding_mask)
    size = x_hat.size
    blocks = min(PARTIALS, -(-size // REDUCE))
    threads = min(REDUCE, 1 << max(0, (-(-size // (blocks * THREAD_ITEMS)) - 1).bit_length()))
    partial = call.empty((blocks,))
    call.launch("commitment_partial_k", blocks, threads, x_hat, centroids, labels, partial)
    total = call.empty((1,))
    call.launch("sum_all_k", 1, min(REDUCE, 1 << max(0, (blocks - 1).bit_length())), partial,
                call.scalar(beta / max(count, 1)), total)
    return total


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> float:
    """:func:`refattn.routing.commitment_loss` on the device; a Python float, as the reference's."""
    call, (x_hat, centroids, beta, key_padding_mask) = intake(check_commitment_loss, x_hat, centroids, beta,
                                                             key_padding_mask)
    loss = commitment_loss_core(call, x_hat, centroids, beta=beta, key_padding_mask=key_padding_mask)
    call.watch_rules(loss, OVERFLOWS["commitment_loss"], x_hat=x_hat, centroids=centroids)
    call.out()
    return float(call.host(loss)[0])


def commitment_loss_vjp_core(call: Call, x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4,
                             key_padding_mask: Any = None) -> Any:
    """dx_hat (B, H, L, D) on the device."""
    count = unpadded_elements(x_hat, key_padding_mask)
    labels = assign_core(call, x_hat, centroids, key_padding_mask=key_padding_mask)
    dx = call.empty(x_hat.shape)
    call.flat("commitment_vjp_k", dx.size, x_hat, centroids, labels, call.scalar(2.0 * beta * dloss / max(count, 1)),
              dx)
    return dx


def commitment_loss_vjp(x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4,
                        key_padding_mask: Any = None) -> Any:
    """:func:`refattn.routing.commitment_loss_vjp` on the device."""
    call, (x_hat, centroids, dloss, beta, key_padding_mask) = intake(
        check_commitment_loss_vjp, x_hat, centroids, dloss, beta, key_padding_mask)
    dx = commitment_loss_vjp_core(call, x_hat, centroids, dloss, beta=beta, key_padding_mask=key_padding_mask)
    call.watch_rules(dx, OVERFLOWS["commitment_loss_vjp"], x_hat=x_hat, centroids=centroids)
    return call.out(dx)


def kernels(dt: Any) -> KernelTable:
    """The commitment-loss kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    size = dt.bitwidth // 8
    tree_sum = device.functions(dt).tree_sum
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def residual(x_hat, centroids, labels, idx):
        """(b, h, t, d) of the flat index into x_hat, and x_hat - centroids[h, label] there (0 at padding)."""
        b, h, t, d = unravel4(idx, x_hat.shape[1], x_hat.shape[2], x_hat.shape[3])
        a = labels[b, h, t]
        return b, h, t, d, x_hat[b, h, t, d] - centroids[h, a, d] if a >= 0 else ZERO

    @kernel("F4 F3 I3 F1", shared=REDUCE * size)
    def commitment_partial_k(x_hat, centroids, labels, partial):
        """partial[block] = sum of (x_hat - centroids[h, label])^2 over this block's grid-stride share of
        the (b, h, t, d) elements with label >= 0 (consecutive threads on consecutive d); a tree
        reduction per block. The grid size depends only on the shape, so the sum is deterministic."""
        part = cuda.shared.array(REDUCE, dt)
        acc = ZERO
        for e in range(cuda.grid(1), x_hat.size, cuda.gridsize(1)):
            r = residual(x_hat, centroids, labels, e)[4]
            acc += r * r
        total = tree_sum(part, cuda.threadIdx.x, cuda.blockDim.x, 1, 0, acc)
        if cuda.threadIdx.x == 0:
            partial[cuda.blockIdx.x] = total

    @kernel("F1 f F1", shared=REDUCE * size)
    def sum_all_k(values, factor, total):
        """total[0] = factor * sum of values: one block (blockDim.x a power of two), strided loads, a tree."""
        part = cuda.shared.array(REDUCE, dt)
        acc = ZERO
        for i in range(cuda.threadIdx.x, values.shape[0], cuda.blockDim.x):
            acc += values[i]
        result = tree_sum(part, cuda.threadIdx.x, cuda.blockDim.x, 1, 0, acc)
        if cuda.threadIdx.x == 0:
            total[0] = factor * result

    @kernel("F4 F3 I3 f F4")
    def commitment_vjp_k(x_hat, centroids, labels, factor, dx):
        """dx = factor (x_hat - centroids[h, label]) where label >= 0, 0 at padding; one thread per element."""
        idx = cuda.grid(1)
        if idx < x_hat.size:
            b, h, t, d, r = residual(x_hat, centroids, labels, idx)
            dx[b, h, t, d] = factor * r

    return table
