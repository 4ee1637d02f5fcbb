"""The W largest int64 keys of every row, ties to the lower position: routing's ``route`` and FSAT's ``select``.

Both reduce their choice to this one: each row's keys are in tie-break order (route: by position;
select: by candidate priority) and have the float order of their scores (``order_key``); padded
positions hold ``SENTINEL``, below every key, never chosen. :func:`select_top` writes each row's
chosen positions in increasing order, -1 in the slots left when fewer than W keys are not padded.

- Rows of at most ``RANK_THREADS`` keys are ranked by counting, one thread per key (its rank is the
  number of keys before it in the order; the members are the ranks below W), several rows per
  block: O(P) per thread, P <= 256.
- Longer rows take an exact radix select, one block per row: the W-th largest key 8 bits at a time
  (a shared-memory histogram, then a block scan over the bins), stopping as soon as the boundary bin
  is taken whole or the keys still in play are all equal, then one block scan per chunk of
  positions writes the members in order: O(P) per row for each of at most 8 passes.
"""

from __future__ import annotations

from typing import Any

from numba import cuda, float64, int32, int64

from . import device
from .kernels import KernelTable, registry
from .runtime import Call

RADIX_BITS = 8  # bits of the key resolved per pass of the radix select
RADIX = 1 << RADIX_BITS  # bins per pass; also the block of the radix-select kernel
RANK_THREADS = 256  # the largest rank-select block, so the longest row it ranks (one thread per key)
SCAN_SLAB = 2 * RADIX  # the ping-pong buffer of a block scan over up to RADIX threads
SENTINEL = -(1 << 63)  # the key of a padded position: below every real key, never chosen
KEY_MAX = (1 << 63) - 1  # above every key
PACK = 1 << 32  # packs two counts (each < 2**31) into one int64 for a single block scan
TOPK_BUDGET_BYTES = 256 * 1024 * 1024  # the keys of one chunk of rows


def key_chunk(rows: int, length: int) -> int:
    """How many rows of ``length`` int64 keys one chunk holds: all of them when they fit, else the rows
    split evenly in chunks within TOPK_BUDGET_BYTES."""
    most = max(1, min(rows, TOPK_BUDGET_BYTES // (8 * max(length, 1))))
    return -(-rows // -(-rows // most))


def select_top(call: Call, keys: Any, row0: int, count: int, window: int, members: Any) -> None:
    """members[row0 + r] = the positions of the ``window`` largest keys[r], ascending (-1 past the
    unpadded ones), for the rows r < ``count`` of the chunk ``keys`` (R, P); members (rows, W) int64."""
    length = keys.shape[1]
    if length <= RANK_THREADS:
        per_block = max(1, min(RANK_THREADS // length, count))
        call.launch("rank_select_k", -(-count // per_block), (length, per_block), keys, row0, count, window,
                    members, bytes_moved=count * (length + window) * 8)
    else:
        passes = 64 // RADIX_BITS + 1  # at most, with the placing sweep
        threads = 32 if call.simulated else RADIX  # any power of two up to RADIX; the simulator pays per thread
        call.launch("radix_select_k", count, threads, keys, row0, count, window, members,
                    bytes_moved=count * (length * passes + window) * 8)


def kernels(dt: Any) -> KernelTable:
    """The selection kernels (the same for every float type: they read int64 keys)."""
    wide = dt == float64
    KEY_BITS = 64 if wide else 32  # the keys of dt's scores lie in (-2^(KEY_BITS-1), 2^(KEY_BITS-1))
    TOP = KEY_BITS - RADIX_BITS  # shift of the most significant digit
    HALF = RADIX // 2
    MASK = RADIX - 1
    fn = device.functions(dt)
    block_scan = fn.block_scan
    table, kernel = registry()

    @kernel("I2 i i i I2", shared=RANK_THREADS * (8 + 4))
    def rank_select_k(keys, row0, count, window, members):
        """Rows of P = blockDim.x <= RANK_THREADS keys, blockDim.y rows per block; thread (t, y) owns key t
        of row y. Its rank

            rank_t = #{u : key_u > key_t  or  (key_u == key_t and u < t)}

        is its place in the order "larger first, lower position first among equals", so the members
        are the unpadded t with rank_t < W, and each writes itself to slot #{taken u < t}. The O(P)
        loops read shared memory, all the threads of a row at one address at a time (a broadcast).
        """
        line = cuda.shared.array(RANK_THREADS, int64)
        taken = cuda.shared.array(RANK_THREADS, int32)
        length = keys.shape[1]
        r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        active = r < count
        t = cuda.threadIdx.x
        first = cuda.threadIdx.y * cuda.blockDim.x  # the row's first slot in ``line`` and ``taken``
        key = keys[r, t] if active else SENTINEL
        line[first + t] = key
        cuda.syncthreads()
        rank = 0
        unpadded = 0
        for u in range(length):
            other = line[first + u]
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
            members[row0 + r, slot] = t
        if active:
            for slot in range(min(unpadded, window) + t, window, cuda.blockDim.x):
                members[row0 + r, slot] = -1

    @kernel("I2 i i i I2", shared=RADIX * 4 + SCAN_SLAB * 8 + 6 * 8)
    def radix_select_k(keys, row0, count, window, members):
        """One block per row of the chunk (``count`` of them), blockDim.x a power of two <= RADIX.

        Select: per pass, a shared histogram of the next RADIX_BITS-bit digit of the keys that share
        the digits found so far (``prefix``), then a block scan over the bins from the top finds the bin
        holding the ``need``-th largest. The passes stop when that bin is taken whole, when the key is
        exact (the last digit, or every key still matching is the same key: exact ties), or at once when
        at most W keys are unpadded. Then every key whose high part (key >> shift) exceeds ``prefix``
        is taken, and the first ``need`` (by position) of those equal to it; one packed block scan per
        chunk of positions gives each taken key its slot.
        """
        hist = cuda.shared.array(RADIX, int32)
        buf = cuda.shared.array(SCAN_SLAB, int64)
        found = cuda.shared.array(6, int64)  # digit, need, count of the boundary bin; min, max, number matching
        length = keys.shape[1]
        r = cuda.blockIdx.x
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
                key = keys[r, t]
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
            if shift == TOP and found[5] <= window:  # at most W unpadded keys: all of them are members
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
                key = keys[r, t]
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
                members[row0 + r, above_seen + before // PACK + min(tied_before, need)] = t
            above_seen += total // PACK
            tied_seen += total % PACK
        taken = above_seen + (0 if take_all else min(tied_seen, need))
        for slot in range(taken + tid, window, threads):
            members[row0 + r, slot] = -1

    return table

