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

from refattn.routing.cluster_attention import check_cluster_attention, check_cluster_attention_vjp
from refattn.routing.profiles import Profile

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import Call, intake
from .normalize import normalize_core, normalize_vjp_core

__all__ = ["cluster_attention", "cluster_attention_vjp", "cluster_attention_core", "cluster_attention_vjp_core",
           "Routed", "TILE", "CHUNK"]

TILE = 32  # slots per tile (and rows of the shared slabs)
CHUNK = 32  # features per slab load
SLAB = TILE * CHUNK  # a shared slab (a literal constant for cuda.shared.array)
LOGITS = TILE * TILE  # a TILE x TILE tile of logits


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
    shape = tuple(routed.q_members.shape)
    o = call.empty(shape + (routed.dim_v,))
    lse = call.empty(shape)
    call.launch("cluster_forward_k", *cluster_launch(routed.q_members, routed.k_members), f_q, f_k, v,
                routed.q_members, routed.k_members, *logit_arguments(call, routed, f_q.shape[3]), o, lse)
    return o, lse


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
    call.watch(o, "the cluster attention", q=q, k=k)
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
                routed.q_members, routed.k_members, *arguments, o, lse, do, delta, dfq)
    call.launch("cluster_backward_key_k", *cluster_launch(routed.k_members, routed.q_members), f_q, f_k, v,
                routed.q_members, routed.k_members, *arguments, lse, do, delta, dfk, dv)
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
    call.watch((dq, dk), "the gradient of the cluster attention", do=do, v=v, q=q, k=k)
    call.watch(dv, "the gradient of the cluster attention", do=do)
    return call.out(dq, dk, dv)


def kernels(dt: Any) -> KernelTable:
    """The cluster-attention kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    size = dt.bitwidth // 8
    FORWARD_SHARED = (SLAB + LOGITS) * size + TILE * 8
    QUERY_SHARED = (SLAB + 2 * LOGITS) * size + TILE * 8
    KEY_SHARED = (SLAB + 2 * LOGITS + 2 * TILE) * size + 2 * TILE * 8
    fn = device.functions(dt)
    stage_listed_rows, stage_slots = fn.stage_listed_rows, fn.stage_slots
    table, kernel = registry()

    @kernel("F4 F4 F4 I4 I4 i i f f F5 F4", shared=FORWARD_SHARED)
    def cluster_forward_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse):
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
                stage_listed_rows(slab, CHUNK, fk, keys, cuda.blockDim.y * count, d0)
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
                stage_listed_rows(slab, CHUNK, v, keys, cuda.blockDim.y * count, d0)
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

    @kernel("F4 F4 F4 I4 I4 i i f f F5 F4 F5 F4 F4", shared=QUERY_SHARED)
    def cluster_backward_query_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, o, lse, do,
                                 delta, dfq):
        """Query side of the backward: delta_w = do_w · o_w, and dfq[i] += scale sum_u dz_wu fk_j (atomic).

        Same cells, groups and key tiling as :func:`cluster_forward_k`. Per key tile: the logits again
        from the fk slab, dp_wu = do_w · v_j from the v slab, p_wu = exp(z_wu - lse_w), dz_wu = p_wu
        (dp_wu - delta_w) (0 where z is the constant self logit), then the fk slab once more for dfq.
        A token that is a query in several clusters receives the sum of its slots, hence the atomics.
        Writes delta (B, H, C, Wq) for :func:`cluster_backward_key_k`.
        """
        slab = cuda.shared.array(SLAB, dt)
        logits = cuda.shared.array(LOGITS, dt)  # z, [key row * TILE + query thread]
        grads = cuda.shared.array(LOGITS, dt)  # dp, then dz
        keys = cuda.shared.array(TILE, int64)  # flat key rows, as in cluster_forward_k
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
                stage_listed_rows(slab, CHUNK, fk, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        f = fq[b, h, i, d0 + x]
                        for r in range(count):
                            logits[(first + r) * TILE + tid] += f * slab[(first + r) * CHUNK + x]
            for d0 in range(0, dim_v, CHUNK):
                stage_listed_rows(slab, CHUNK, v, keys, cuda.blockDim.y * count, d0)
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
                stage_listed_rows(slab, CHUNK, fk, keys, cuda.blockDim.y * count, d0)
                if live:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        if acc != ZERO:
                            cuda.atomic.add(dfq, (b, h, i, d0 + x), acc * scale)

    @kernel("F4 F4 F4 I4 I4 i i f f F4 F5 F4 F4 F4", shared=KEY_SHARED)
    def cluster_backward_key_k(fq, fk, v, q_members, k_members, causal, self_masked, self_logit, scale, lse, do,
                               delta, dfk, dv):
        """Key side of the backward: dfk[j] += scale sum_w dz_wu fq_i and dv[j] += sum_w p_wu do_w (atomic).

        Cells (b * H + h, c, key tile), blockDim.y of them per block as in :func:`cluster_forward_k`, one
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
                stage_listed_rows(slab, CHUNK, fq, queries, cuda.blockDim.y * count, d0)
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
                stage_slots(slab, CHUNK, do, cells, count, w0, d0)
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
                stage_listed_rows(slab, CHUNK, fq, queries, cuda.blockDim.y * count, d0)
                if j >= 0:
                    for x in range(min(CHUNK, dim - d0)):
                        acc = ZERO
                        for r in range(count):
                            acc += grads[(first + r) * TILE + tid] * slab[(first + r) * CHUNK + x]
                        if acc != ZERO:
                            cuda.atomic.add(dfk, (b, h, j, d0 + x), acc * scale)
    return table
