"""Routing step 4 on the device (:mod:`refattn.routing.cluster_attention`, whose checks it runs).

How it differs from the reference: fused kernels instead of gathered (chunk, W, W) logits.

- The logit features are the device normalization (:mod:`.normalize`); the routing pipeline passes
  the normalized q and k it routed with, so they are computed once.
- Forward: a thread per query slot, a block per (b * H + h, cluster, tile of query slots), or per
  several clusters when the windows are small (``groups`` cells per block: small clusters share a
  block instead of each leaving most of a warp idle). Key and value rows, gathered through
  ``k_members``, are staged in shared-memory slabs of TILE rows x CHUNK features (coalesced loads,
  :func:`stage_listed_rows`); a tile of logits lives in shared memory ([key row, query thread]:
  each thread's column is conflict-free) under an online softmax: no W x W logits in device memory.
- Backward: the forward again (for o and the log-sum-exp), then a query-side and a key-side kernel
  that recompute the logits; the slot gradients go to positions with atomic adds (a token can be in
  several clusters: their order varies from run to run, so results may differ in the last bits,
  within the tolerances), and the normalization's VJP pulls them back through the features.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from numba import cuda, int64

from refattn.routing.cluster_attention import OVERFLOWS, check_cluster_attention, check_cluster_attention_vjp
from refattn.routing.profiles import Profile

from .. import device
from ..device import LIST_CHUNK, LIST_ROWS
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .normalize import normalize_core, normalize_vjp_core

__all__ = ["cluster_attention", "cluster_attention_vjp", "cluster_attention_core", "cluster_attention_vjp_core",
           "Routed", "TILE", "SLAB", "LOGITS"]

TILE = LIST_ROWS  # slots per tile (and rows of the shared slabs)
SLAB = LIST_ROWS * LIST_CHUNK  # a shared slab (a literal constant for cuda.shared.array)
LOGITS = LIST_ROWS * LIST_ROWS  # a tile of logits, [key row * TILE + query thread]


class Routed(NamedTuple):
    """One cluster-attention call's configuration, on the device."""

    profile: Profile
    causal: bool
    shared_qk: bool
    q_members: Any  # (B, H, C, Wq) int64
    k_members: Any  # (B, H, C, Wk) int64
    dim_v: int


def features(call: Call, routed: Routed, q: Any, k: Any, q_hat: Any = None, k_hat: Any = None) -> tuple[Any, Any]:
    """(f_q, f_k), the (B, H, L, D) rows whose dot products are the logits (spec/routing.md, step 4).

    ``q_hat``, ``k_hat``: the profile's normalization of q and k where the caller has it already (the
    routing pipeline routes with it); a needed one that is missing is computed here.
    """
    profile = routed.profile

    def normalized(x: Any, known: Any) -> Any:
        return normalize_core(call, x, profile=profile) if known is None else known

    if profile.logits_use_normalized:
        f_q = normalized(q, q_hat)
        return f_q, (f_q if routed.shared_qk else normalized(k, k_hat))
    return q, (normalized(q, q_hat) if routed.shared_qk else k)


def logit_arguments(call: Call, routed: Routed, dim: int) -> tuple[int, int, Any, Any]:
    """(causal, self_masked, self_logit, scale) as the kernels take them."""
    profile = routed.profile
    self_masked = routed.shared_qk and profile.self_logit is not None
    scale = 1.0 / math.sqrt(dim) if profile.scaled_logits else 1.0
    return int(routed.causal), int(self_masked), call.scalar(profile.self_logit if self_masked else 0.0), \
        call.scalar(scale)


def cluster_launch(own: Any, other: Any) -> tuple[int, tuple[int, int]]:
    """(blocks, (threads, groups)) of the cluster kernels, one thread per slot of ``own`` (the query
    members; the key members in the key-side backward), ``other`` the members on the other side.

    A cell is (b * H + h, cluster, tile of up to TILE slots); a block holds ``groups`` cells, as many
    as the tiles of ``other`` slots they stage fit in the TILE rows of the shared arrays: one unless
    both windows are at most TILE / 2.
    """
    batch, heads, clusters, window = own.shape
    threads = min(TILE, window)
    cells = batch * heads * clusters * -(-window // threads)
    groups = min(TILE // max(threads, min(TILE, other.shape[3])), cells)
    return -(-cells // groups), (threads, groups)


def cluster_forward(call: Call, routed: Routed, f_q: Any, f_k: Any, v: Any) -> tuple[Any, Any]:
    """(o (B, H, C, Wq, Dv), lse (B, H, C, Wq)) on the device."""
    batch, heads, clusters, window = routed.q_members.shape
    o = call.empty((batch, heads, clusters, window, routed.dim_v))
    lse = call.empty((batch, heads, clusters, window))
    call.launch("cluster_forward_k", *cluster_launch(routed.q_members, routed.k_members), f_q, f_k, v,
                routed.q_members, routed.k_members, *logit_arguments(call, routed, f_q.shape[3]), slots(o),
                slots(lse))
    return o, lse


def slots(x: Any) -> Any:
    """(B, H, C, W, ·) as (B, H, C * W, ·): the slot rows the kernels index as rows c * W + w."""
    shape = tuple(x.shape)
    return x.reshape(shape[0], shape[1], shape[2] * shape[3], *shape[4:])


def cluster_attention_core(call: Call, q: Any, k: Any, v: Any, q_members: Any, k_members: Any, *,
                           causal: bool = False, shared_qk: bool = False, profile: Profile) -> Any:
    """o (B, H, C, Wq, Dv) on the device."""
    routed = Routed(profile, causal, shared_qk, q_members, k_members, v.shape[3])
    return cluster_forward(call, routed, *features(call, routed, q, k), v)[0]


def cluster_attention(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, *, causal: bool = False,
                      shared_qk: bool = False, profile: str = "tacl") -> Any:
    """:func:`refattn.routing.cluster_attention` on the device."""
    call, (q, k, v, q_members, k_members, causal, shared_qk, profile) = intake(
        check_cluster_attention, q, k, v, q_members, k_members, causal, shared_qk, profile)
    o = cluster_attention_core(call, q, k, v, q_members, k_members, causal=causal, shared_qk=shared_qk,
                               profile=profile)
    call.watch_rules(o, OVERFLOWS["cluster_attention"], q=q, k=k)
    return call.out(o)


def cluster_backward(call: Call, routed: Routed, q: Any, k: Any, v: Any, do: Any, q_hat: Any = None,
                     k_hat: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk or None, dv) of device arrays; ``q_hat``, ``k_hat`` as :func:`features` takes them."""
    profile = routed.profile
    f_q, f_k = features(call, routed, q, k, q_hat, k_hat)
    o, lse = cluster_forward(call, routed, f_q, f_k, v)
    arguments = logit_arguments(call, routed, q.shape[3])
    delta = call.empty(lse.shape)
    dfq = call.zeros(q.shape)
    # tacl with shared QK: both feature gradients pull back through the same LN(q), so they share a buffer
    dfk = dfq if routed.shared_qk and profile.logits_use_normalized else call.zeros(q.shape)
    dv = call.zeros(v.shape)
    call.launch("cluster_backward_query_k", *cluster_launch(routed.q_members, routed.k_members), f_q, f_k, v,
                routed.q_members, routed.k_members, *arguments, slots(o), slots(lse), slots(do), slots(delta), dfq)
    call.launch("cluster_backward_key_k", *cluster_launch(routed.k_members, routed.q_members), f_q, f_k, v,
                routed.q_members, routed.k_members, *arguments, slots(lse), slots(do), slots(delta), dfk, dv)
    if profile.logits_use_normalized:
        dq = normalize_vjp_core(call, q, dfq, profile=profile)
        return dq, (None if routed.shared_qk else normalize_vjp_core(call, k, dfk, profile=profile)), dv
    if routed.shared_qk:
        return normalize_vjp_core(call, q, dfk, profile=profile, base=dfq), None, dv
    return dfq, dfk, dv


def cluster_attention_vjp_core(call: Call, q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, *,
                               causal: bool = False, shared_qk: bool = False, profile: Profile
                               ) -> tuple[Any, Any, Any]:
    """(dq, dk or None, dv) on the device."""
    routed = Routed(profile, causal, shared_qk, q_members, k_members, v.shape[3])
    return cluster_backward(call, routed, q, k, v, do)


def cluster_attention_vjp(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, *, causal: bool = False,
                          shared_qk: bool = False, profile: str = "tacl") -> tuple[Any, Any, Any]:
    """:func:`refattn.routing.cluster_attention_vjp` on the device."""
    call, (q, k, v, q_members, k_members, do, causal, shared_qk, profile) = intake(
        check_cluster_attention_vjp, q, k, v, q_members, k_members, do, causal, shared_qk, profile)
    dq, dk, dv = cluster_attention_vjp_core(call, q, k, v, q_members, k_members, do, causal=causal,
                                            shared_qk=shared_qk, profile=profile)
    call.watch_rules((dq, dk, dv), OVERFLOWS["cluster_attention_vjp"], q=q, k=k, v=v, do=do)
    return call.out(dq, dk, dv)


def tile_shared(itemsize: int, tiles: int, row_values: int, row_lists: int) -> int:
    """Static shared memory of a slab kernel: the slab, ``tiles`` tiles of logits, ``row_values`` per-row
    values and ``row_lists`` lists of flat rows (int64)."""
    return (SLAB + tiles * LOGITS + row_values * TILE) * itemsize + row_lists * TILE * 8


def kernels(dt: Any) -> KernelTable:
    """The cluster-attention kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    size = dt.bitwidth // 8
    fn = device.functions(dt)
    listed_products, listed_accumulate, softmax_tile = fn.listed_products, fn.listed_accumulate, fn.softmax_tile
    clear_row, finish_row, row_dot, nan_max = fn.clear_row, fn.finish_row, fn.row_dot, fn.nan_max
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def cell_of(own, length):
        """(b, h, c, s, active, slot, position, flat row of (b, h, 0)) of this thread: cells (b * H + h, c,
        tile of blockDim.x slots s of the ``own`` members), tile fastest, blockDim.y cells (groups) per block,
        a thread per slot; ``active``: its cell exists, ``slot``: its slot too, ``position``: own[b, h, c, s]
        (-1 for an empty or missing slot)."""
        heads, clusters, window = own.shape[1], own.shape[2], own.shape[3]
        tiles = (window + cuda.blockDim.x - 1) // cuda.blockDim.x
        cell = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        bh = cell // (tiles * clusters)
        b = bh // heads
        h = bh - b * heads
        c = (cell // tiles) % clusters
        s = (cell % tiles) * cuda.blockDim.x + cuda.threadIdx.x
        active = cell < own.shape[0] * heads * clusters * tiles
        slot = active and s < window
        return b, h, c, s, active, slot, own[b, h, c, s] if slot else -1, bh * length

    @cuda.jit(device=True, inline=True)
    def list_rows(rows, first, count, members, b, h, c, s0, row0, active):
        """rows[first + r] = row0 + members[b, h, c, s0 + r] (the flat row of that position), -1 for an empty slot."""
        for r in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            j = members[b, h, c, s0 + r] if active else -1
            rows[first + r] = row0 + j if j >= 0 else -1

    @cuda.jit(device=True, inline=True)
    def clear_tile(weights, first, count):
        for r in range(count):
            weights[(first + r) * TILE + cuda.threadIdx.x] = ZERO

    @kernel("F4 F4 F4 I4 I4 i i f f F4 F3", shared=tile_shared(size, 1, 0, 1))
    def cluster_forward_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse):
        """o[b, h, c W + w] = sum_u softmax_u(z_wu) v_j, lse[b, h, c W + w] = log sum_u exp(z_wu), over the valid
        keys: z_wu = scale fq_i . fk_j for query i = q_members[c, w], key j = k_members[c, u] (j >= 0, j <= i
        when causal; z = self_logit where j = i when self_masked). Per tile of TILE key slots: the fk rows
        staged, the logits in shared memory, the online softmax, then the v rows into the output row.
        Empty query slots and queries with no valid key get o = 0 and lse = -inf."""
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)
        keys = cuda.shared.array(TILE, int64)  # flat rows (b * H + h) * L + j of the key tile, -1 if empty
        wq, wk = q_members.shape[3], k_members.shape[3]
        b, h, c, w, active, slot, i, row0 = cell_of(q_members, fq.shape[2])
        run_max = NEG_INF
        run_sum = ZERO
        clear_row(o, b, h, c * wq + w, slot)
        for u0 in range(0, wk, TILE):
            count = min(TILE, wk - u0)
            first = cuda.threadIdx.y * count  # this group's rows of keys, the slab and the logits
            # No barrier before refilling the tile arrays: the previous tile read them before the closing
            # barrier of its last stage, and the first stage below opens with one.
            list_rows(keys, first, count, k_members, b, h, c, u0, row0, active)
            clear_tile(logits, first, count)
            listed_products(logits, first, count, slab, fk, keys, cuda.blockDim.y * count, fq, b, h, i, i >= 0)
            tile_max = NEG_INF
            if i >= 0:
                for r in range(count):
                    j = keys[first + r] - row0  # < 0 for an empty key slot
                    z = NEG_INF
                    if j >= 0 and not (causal and j > i):
                        z = self_logit if (self_masked and j == i) else logits[(first + r) * TILE + cuda.threadIdx.x] \
                            * scale
                    logits[(first + r) * TILE + cuda.threadIdx.x] = z
                    tile_max = nan_max(tile_max, z)  # an overflowed (NaN) logit stays in
            live, decay, run_max, run_sum = softmax_tile(logits, first, count, tile_max, run_max, run_sum)
            listed_accumulate(o, b, h, c * wq + w, logits, first, count, slab, v, keys, cuda.blockDim.y * count,
                              decay, ONE, live, False)
        finish_row(o, lse, b, h, c * wq + w, run_max, run_sum, slot)

    @kernel("F4 F4 F4 I4 I4 i i f f F4 F3 F4 F3 F4", shared=tile_shared(size, 2, 0, 1))
    def cluster_backward_query_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse, do,
                                 delta, dfq):
        """Query side of the backward: delta_w = do_w . o_w, and dfq[i] += scale sum_u dz_wu fk_j (atomic: a token
        that is a query in several clusters receives the sum of its slots). Cells and key tiles as
        :func:`cluster_forward_k`; per key tile the logits again, dp_wu = do_w . v_j, p_wu = exp(z_wu - lse_w),
        dz_wu = p_wu (dp_wu - delta_w) (0 where z is the constant self logit). Writes delta for the key side."""
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        keys = cuda.shared.array(TILE, int64)
        wq, wk = q_members.shape[3], k_members.shape[3]
        b, h, c, w, active, slot, i, row0 = cell_of(q_members, fq.shape[2])
        row_lse = NEG_INF
        row_delta = ZERO
        if slot:
            row_delta = row_dot(do, o, b, h, c * wq + w)
            delta[b, h, c * wq + w] = row_delta
            row_lse = lse[b, h, c * wq + w]
        # A query with no valid key has no gradient; a NaN lse (an overflow) stays in, and its NaN gradient
        # reaches the overflow check.
        live = i >= 0 and row_lse != NEG_INF
        for u0 in range(0, wk, TILE):
            count = min(TILE, wk - u0)
            first = cuda.threadIdx.y * count
            list_rows(keys, first, count, k_members, b, h, c, u0, row0, active)
            clear_tile(logits, first, count)
            clear_tile(grads, first, count)
            listed_products(logits, first, count, slab, fk, keys, cuda.blockDim.y * count, fq, b, h, i, live)
            listed_products(grads, first, count, slab, v, keys, cuda.blockDim.y * count, do, b, h, c * wq + w, live)
            if live:
                for r in range(count):
                    j = keys[first + r] - row0  # < 0 for an empty key slot
                    g = ZERO
                    if j >= 0 and not (causal and j > i) and not (self_masked and j == i):
                        p = math.exp(logits[(first + r) * TILE + cuda.threadIdx.x] * scale - row_lse)
                        g = p * (grads[(first + r) * TILE + cuda.threadIdx.x] - row_delta)
                    grads[(first + r) * TILE + cuda.threadIdx.x] = g
            listed_accumulate(dfq, b, h, i, grads, first, count, slab, fk, keys, cuda.blockDim.y * count, ONE, scale,
                              live, True)

    @kernel("F4 F4 F4 I4 I4 i i f f F3 F4 F3 F4 F4", shared=tile_shared(size, 2, 2, 2))
    def cluster_backward_key_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, lse, do,
                               delta, dfk, dv):
        """Key side of the backward: dfk[j] += scale sum_w dz_wu fq_i and dv[j] += sum_w p_wu do_w (atomic: a
        token that is a key in several clusters receives the sum of its slots). Cells (b * H + h, c, tile of
        key slots) as :func:`cluster_forward_k`'s, a thread per key slot u; per tile of TILE query slots their
        positions, slot rows, lse and delta listed in shared memory: the logits from the fq rows, p = exp(z - lse),
        dp = v_j . do_w, dv from the do rows, dz = p (dp - delta) (0 at the constant self logit), dfk."""
        slab = cuda.shared.array(SLAB, dt)
        probs = cuda.shared.array(LOGITS, dt)  # z, then p, [query row * TILE + key thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        queries = cuda.shared.array(TILE, int64)  # flat rows (b * H + h) * L + i of the query tile, -1 if empty
        rows = cuda.shared.array(TILE, int64)  # flat slot rows (b * H + h) * C * Wq + c * Wq + w of do
        row_lse = cuda.shared.array(TILE, dt)
        row_delta = cuda.shared.array(TILE, dt)
        heads, clusters, wq = q_members.shape[1], q_members.shape[2], q_members.shape[3]
        b, h, c, u, active, slot, j, row0 = cell_of(k_members, fq.shape[2])
        for w0 in range(0, wq, TILE):
            count = min(TILE, wq - w0)
            first = cuda.threadIdx.y * count  # this group's rows of the listed arrays, the slab and the tiles
            list_rows(queries, first, count, q_members, b, h, c, w0, row0, active)
            for r in range(cuda.threadIdx.x, count, cuda.blockDim.x):
                rows[first + r] = (b * heads + h) * clusters * wq + c * wq + w0 + r if active else -1
                row_lse[first + r] = lse[b, h, c * wq + w0 + r] if active else NEG_INF
                row_delta[first + r] = delta[b, h, c * wq + w0 + r] if active else ZERO
            clear_tile(probs, first, count)
            clear_tile(grads, first, count)
            staged = cuda.blockDim.y * count
            listed_products(probs, first, count, slab, fq, queries, staged, fk, b, h, j, j >= 0)
            if j >= 0:
                for r in range(count):
                    i = queries[first + r] - row0  # < 0 for an empty query slot
                    p = ZERO
                    if i >= 0 and row_lse[first + r] != NEG_INF and not (causal and j > i):
                        z = self_logit if (self_masked and j == i) else probs[(first + r) * TILE + cuda.threadIdx.x] \
                            * scale
                        p = math.exp(z - row_lse[first + r])
                    probs[(first + r) * TILE + cuda.threadIdx.x] = p
            listed_products(grads, first, count, slab, do, rows, staged, v, b, h, j, j >= 0)
            listed_accumulate(dv, b, h, j, probs, first, count, slab, do, rows, staged, ONE, ONE, j >= 0, True)
            if j >= 0:
                for r in range(count):
                    g = probs[(first + r) * TILE + cuda.threadIdx.x] * (grads[(first + r) * TILE + cuda.threadIdx.x]
                                                                          - row_delta[first + r])
                    grads[(first + r) * TILE + cuda.threadIdx.x] = ZERO if (self_masked and row0 + j
                                                                              == queries[first + r]) else g
            listed_accumulate(dfk, b, h, j, grads, first, count, slab, fq, queries, staged, ONE, scale, j >= 0, True)

    return table
