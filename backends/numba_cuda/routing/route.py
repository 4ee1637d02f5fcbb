"""Routing step 3 on the device (:mod:`refattn.routing.route`, whose checks it runs).

How it differs from the reference: the similarities of each (b, h, c) row become int64 keys of the
same order (``order_key``; padded tokens the ``SENTINEL`` below every key), transposed to rows of
positions through a shared tile (coalesced on both sides), a chunk of rows at a time (the keys of
one chunk stay within ``topk.TOPK_BUDGET_BYTES``); :mod:`..topk` chooses each row's W largest, ties
to the lower position, exactly (no partition).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, int64

from refattn.routing.route import check_route

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from ..topk import SENTINEL, key_chunk, select_top

__all__ = ["route", "route_core", "padding_flags"]

TRANSPOSE = 32  # side of the shared tile that transposes the keys
TRANSPOSE_SLAB = TRANSPOSE * (TRANSPOSE + 1)


def padding_flags(call: Call, mask: np.ndarray | None, batch: int, length: int) -> Any:
    """(B, L) int64 on the device: 1 = padding, all 0 without a mask."""
    if mask is None:
        return call.zeros((batch, length), np.int64)
    return call.upload(mask, np.int64)


def route_core(call: Call, scores: Any, window: int, padded: Any) -> Any:
    """members (B, H, C, W) int64 of the device similarities (B, H, L, C) and padding flags (B, L)."""
    batch, heads, length, clusters = scores.shape
    rows = batch * heads * clusters
    members = call.empty((batch, heads, clusters, window), np.int64)
    flat = members.reshape(rows, window)
    chunk = key_chunk(rows, length)
    keys = call.empty((chunk, length), np.int64)
    block = (min(TRANSPOSE, chunk), min(8, length))
    for row0 in range(0, rows, chunk):
        count = min(chunk, rows - row0)
        call.launch("route_keys_k", -(-count // TRANSPOSE) * -(-length // TRANSPOSE), block, scores, padded, row0,
                    count, keys)
        select_top(call, keys, row0, count, window, flat)
    return members


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.routing.route` on the device."""
    call, (scores, window, key_padding_mask) = intake(check_route, similarities, window, key_padding_mask)
    padded = padding_flags(call, key_padding_mask, scores.shape[0], scores.shape[2])
    return call.out(route_core(call, scores, window, padded))


def kernels(dt: Any) -> KernelTable:
    """The route's key kernel for the float type ``dt`` (the choice itself is :mod:`..topk`'s)."""
    order_key = device.functions(dt).order_key
    table, kernel = registry()

    @kernel("F4 I2 i i I2", shared=TRANSPOSE_SLAB * 8)
    def route_keys_k(s, padded, row0, count, keys):
        """keys[r, t] = order key of s[b, h, t, c], SENTINEL where padded[b, t], for the rows
        (b * H + h) * C + c = row0 + r < row0 + count. A TRANSPOSE x TRANSPOSE tile per block (blocks:
        row tiles fastest, then position tiles): read with consecutive threads on consecutive rows
        (consecutive c), written with consecutive threads on consecutive t."""
        tile = cuda.shared.array(TRANSPOSE_SLAB, int64)
        heads, length, clusters = s.shape[1], s.shape[2], s.shape[3]
        row_tiles = (count + TRANSPOSE - 1) // TRANSPOSE
        r0 = (cuda.blockIdx.x % row_tiles) * TRANSPOSE
        t0 = (cuda.blockIdx.x // row_tiles) * TRANSPOSE
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        for i in range(ty, TRANSPOSE, rows):
            t = t0 + i
            for j in range(tx, TRANSPOSE, cols):
                r = r0 + j
                if t < length and r < count:
                    row = row0 + r
                    bh = row // clusters
                    c = row - bh * clusters
                    b = bh // heads
                    key = SENTINEL if padded[b, t] != 0 else order_key(s[b, bh - b * heads, t, c])
                    tile[j * (TRANSPOSE + 1) + i] = key
        cuda.syncthreads()
        for i in range(ty, TRANSPOSE, rows):
            r = r0 + i
            for j in range(tx, TRANSPOSE, cols):
                t = t0 + j
                if r < count and t < length:
                    keys[r, t] = tile[i * (TRANSPOSE + 1) + j]

    return table
