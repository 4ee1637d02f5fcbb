"""FSAT step 2b on the device (:mod:`refattn.fsat.select`, whose checks it runs).

How it differs from the reference: instead of a stable sort, the candidates are laid out in the
tie-break order of :func:`refattn.fsat.select.candidate_order` as int64 keys of their scores
(``order_key``), and the K - 1 largest are chosen by :mod:`..topk`'s exact selection (ties to the
earlier candidate: the reference's rule), O(L) per row; a block scan per row then lists the offsets
in ascending order. Scores are compared in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, int64

from refattn.fsat.select import check_select

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from ..topk import PACK, RADIX, SCAN_SLAB, key_chunk, select_top

__all__ = ["select", "select_core"]


def select_core(call: Call, s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> Any:
    """offsets (B, H, K_eff) int64, ascending."""
    batch, heads, count = s.shape
    length = (count + 1) // 2
    candidates = (length - 1) if causal else (2 * length - 2)
    wanted = min(top_k, candidates + 1) - 1
    rows = batch * heads
    members = call.empty((rows, wanted), np.int64)
    if wanted:
        chunk = key_chunk(rows, candidates)
        keys = call.empty((chunk, candidates), np.int64)
        for row0 in range(0, rows, chunk):
            count = min(chunk, rows - row0)
            call.flat("select_keys_k", count * candidates, s, s if noise is None else noise, int(noise is not None),
                      int(causal), row0, count, keys)
            select_top(call, keys, row0, count, wanted, members)
    offsets = call.empty((batch, heads, wanted + 1), np.int64)
    threads = min(RADIX, 1 << max(0, (max(wanted, 1) - 1).bit_length()))
    call.launch("select_place_k", rows, threads, members, int(causal), length, offsets)
    return offsets


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> Any:
    """:func:`refattn.fsat.select` on the device."""
    call, (s, top_k, causal, noise) = intake(check_select, s, top_k, causal, noise)
    return call.out(select_core(call, s, top_k, causal=causal, noise=noise))


def kernels(dt: Any) -> KernelTable:
    """The selection's own kernels for the float type ``dt`` (the choice itself is :mod:`..topk`'s)."""
    fn = device.functions(dt)
    order_key, block_scan = fn.order_key, fn.block_scan
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def candidate(index, causal):
        """The offset of candidate ``index`` in tie-break order: -1, 1, -2, 2, ... (causal: -1, -2, ...)."""
        if causal:
            return -(index + 1)
        return -(index // 2 + 1) if index % 2 == 0 else index // 2 + 1

    @kernel("F3 F3 i i i i I2")
    def select_keys_k(s, noise, has_noise, causal, row0, count, keys):
        """keys[r, i] = order key of s + noise at candidate i of row (b * H + h) = row0 + r, r < count;
        consecutive threads on consecutive candidates."""
        idx = cuda.grid(1)
        candidates = keys.shape[1]
        if idx >= count * candidates:
            return
        r = idx // candidates
        i = idx - r * candidates
        heads = s.shape[1]
        row = row0 + r
        b = row // heads
        h = row - b * heads
        t = candidate(i, causal) + (s.shape[2] - 1) // 2
        score = s[b, h, t] + noise[b, h, t] if has_noise else s[b, h, t]
        keys[r, i] = order_key(score)

    @kernel("I2 i i I3", shared=SCAN_SLAB * 8)
    def select_place_k(members, causal, length, offsets):
        """offsets[b, h] = the chosen candidates (members, ascending candidate index) and 0, ascending: the
        negative ones in reverse order, then 0, then the positive ones. One block per (b, h); a first
        scan counts the negative ones, a packed scan per chunk then places each offset."""
        buf = cuda.shared.array(SCAN_SLAB, int64)
        heads = offsets.shape[1]
        row = cuda.blockIdx.x
        b = row // heads
        h = row - b * heads
        wanted = members.shape[1]
        tid, threads = cuda.threadIdx.x, cuda.blockDim.x
        negatives = int64(0)
        for start in range(0, wanted, threads):
            i = start + tid
            negative = 1 if i < wanted and candidate(members[row, i], causal) < 0 else 0
            _, total = block_scan(buf, negative)
            negatives += total
        if tid == 0:
            offsets[b, h, negatives] = 0
        seen_negative = int64(0)
        seen_positive = int64(0)
        for start in range(0, wanted, threads):
            i = start + tid
            tau = candidate(members[row, i], causal) if i < wanted else 0
            packed = (PACK if tau < 0 else 0) + (1 if tau > 0 else 0)
            inclusive, total = block_scan(buf, packed)
            before = inclusive - packed
            if tau < 0:
                offsets[b, h, negatives - 1 - (seen_negative + before // PACK)] = tau
            elif tau > 0:
                offsets[b, h, negatives + 1 + seen_positive + before % PACK] = tau
            seen_negative += total // PACK
            seen_positive += total % PACK

    return table

