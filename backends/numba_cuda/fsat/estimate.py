"""FSAT step 2a on the device (:mod:`refattn.fsat.estimate`, whose checks it runs).

How it differs from the reference: each score is one row of lanes over the features (a tree sum);
dw is reduced in parallel over (B, 2L - 1): each block sums a contiguous part of the (b, t) items
for every feature of one head, and a second kernel adds the parts (deterministic, no atomics).
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from refattn.fsat.estimate import OVERFLOWS, check_estimate, check_estimate_vjp

from .. import device
from ..device import unravel4
from ..kernels import KernelTable, registry
from ..runtime import Call, intake, row_launch
from .cross import pair_counts_core

__all__ = ["estimate", "estimate_vjp", "estimate_core", "estimate_vjp_core"]

ITEMS = 16  # (b, t) items a thread of the dw reduction adds on its own
MAX_PARTS = 1_024  # the most blocks (parts) per head of the dw reduction
REDUCE = 256  # the largest block of the reductions


def estimate_core(call: Call, c: Any, w: Any, counts: Any) -> Any:
    """s (B, H, 2L - 1) = <w_h, c_tau> / sqrt(Dc), -inf where n_tau = 0."""
    s = call.empty(c.shape[:3])
    call.launch("estimate_k", *row_launch(c.shape[3], s.size), c, w, counts,
                call.scalar(1.0 / math.sqrt(c.shape[3])), s)
    return s


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.fsat.estimate` on the device."""
    call, (c, w, key_padding_mask) = intake(check_estimate, c, w, key_padding_mask)
    s = estimate_core(call, c, w, pair_counts_core(call, (c.shape[2] + 1) // 2, key_padding_mask))
    call.watch_rules(s, OVERFLOWS["estimate"], c=c, w=w)
    return call.out(s)


def dw_launch(batch: int, count: int, heads: int, features: int) -> tuple[int, tuple[int, int], int]:
    """(blocks, (lanes, rows), parts) of the dw reduction: lanes on consecutive features, rows of (b, t)
    items, each thread adding about ITEMS of them; parts per head, blocks = heads * parts."""
    lanes = min(32, 1 << max(0, math.ceil(math.log2(features))))
    items = batch * count
    rows = min(REDUCE // lanes, 1 << max(0, math.ceil(math.log2(-(-items // ITEMS)))))
    parts = max(1, min(MAX_PARTS, -(-items // (rows * ITEMS))))
    return heads * parts, (lanes, rows), parts


def estimate_vjp_core(call: Call, c: Any, w: Any, ds: Any, counts: Any, *, with_dc: bool = True) -> tuple[Any, Any]:
    """(dc, dw) over the offsets with pairs (dc None unless ``with_dc``)."""
    batch, heads, count, features = c.shape
    rscale = call.scalar(1.0 / math.sqrt(features))
    dc = None
    if with_dc:
        dc = call.empty(c.shape)
        call.flat("estimate_dc_k", dc.size, ds, w, counts, rscale, dc)
    blocks, block, parts = dw_launch(batch, count, heads, features)
    partial = call.empty((heads, parts, features))
    call.launch("estimate_dw_parts_k", blocks, block, ds, c, counts, partial)
    dw = call.empty(w.shape)
    call.flat("estimate_dw_k", dw.size, partial, rscale, dw)
    return dc, dw


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """:func:`refattn.fsat.estimate_vjp` on the device."""
    call, (c, w, ds, key_padding_mask) = intake(check_estimate_vjp, c, w, ds, key_padding_mask)
    dc, dw = estimate_vjp_core(call, c, w, ds, pair_counts_core(call, (c.shape[2] + 1) // 2, key_padding_mask))
    call.watch_rules((dc, dw), OVERFLOWS["estimate_vjp"], c=c, w=w, ds=ds)
    return call.out(dc, dw)


def kernels(dt: Any) -> KernelTable:
    """The estimate kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    NEG_INF = dt(-math.inf)
    size = dt.bitwidth // 8
    tree_sum = device.functions(dt).tree_sum
    table, kernel = registry()

    @kernel("F4 F2 I2 f F3", shared=REDUCE * size)
    def estimate_k(c, w, counts, rscale, s):
        """One row (b, h, t) per blockDim.x lanes (consecutive features), blockDim.y rows per block."""
        part = cuda.shared.array(REDUCE, dt)
        batch, heads, count, features = c.shape
        lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = row < batch * heads * count
        t = row % count
        h = (row // count) % heads
        b = row // (count * heads)
        acc = ZERO
        if active:
            for f in range(lane, features, lanes):
                acc += w[h, f] * c[b, h, t, f]
        total = tree_sum(part, lane, lanes, 1, cuda.threadIdx.y * lanes, acc)
        if active and lane == 0:
            s[b, h, t] = total * rscale if counts[b if counts.shape[0] > 1 else 0, t] > 0 else NEG_INF

    @kernel("F3 F2 I2 f F4")
    def estimate_dc_k(ds, w, counts, rscale, dc):
        """dc[b, h, t, f] = ds[b, h, t] w[h, f] / sqrt(Dc) where n_tau > 0, else 0; f fastest."""
        idx = cuda.grid(1)
        if idx >= dc.size:
            return
        b, h, t, f = unravel4(idx, dc.shape[1], dc.shape[2], dc.shape[3])
        has_pairs = counts[b if counts.shape[0] > 1 else 0, t] > 0
        dc[b, h, t, f] = ds[b, h, t] * w[h, f] * rscale if has_pairs else ZERO

    @kernel("F3 F4 I2 F3", shared=REDUCE * size)
    def estimate_dw_parts_k(ds, c, counts, partial):
        """partial[h, part, f] = sum over this part's (b, t) items with n_tau > 0 of ds[b, h, t] c[b, h, t, f].

        Block (lanes on consecutive features, rows of items), grid heads * parts; the items of a part
        are contiguous, each row thread adds every rows-th one, then a tree sum over the rows."""
        buf = cuda.shared.array(REDUCE, dt)
        batch, heads, count, features = c.shape
        parts = partial.shape[1]
        h = cuda.blockIdx.x // parts
        p = cuda.blockIdx.x - h * parts
        lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
        y, rows = cuda.threadIdx.y, cuda.blockDim.y
        items = batch * count
        per = -(-items // parts)
        first = p * per
        last = min(items, first + per)
        for f0 in range(0, features, lanes):
            f = f0 + lane
            acc = ZERO
            if f < features:
                for item in range(first + y, last, rows):
                    b = item // count
                    t = item - b * count
                    if counts[b if counts.shape[0] > 1 else 0, t] > 0:
                        acc += ds[b, h, t] * c[b, h, t, f]
            total = tree_sum(buf, y, rows, lanes, lane, acc)
            if y == 0 and f < features:
                partial[h, p, f] = total

    @kernel("F3 f F2")
    def estimate_dw_k(partial, rscale, dw):
        """dw[h, f] = (sum over the parts of partial[h, ·, f]) / sqrt(Dc)."""
        idx = cuda.grid(1)
        heads, parts, features = partial.shape
        if idx >= heads * features:
            return
        h = idx // features
        f = idx - h * features
        acc = ZERO
        for p in range(parts):
            acc += partial[h, p, f]
        dw[h, f] = acc * rscale

    return table
