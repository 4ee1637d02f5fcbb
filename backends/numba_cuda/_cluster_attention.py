"""Routing steps 4-6 on Numba-CUDA kernels: attention inside the clusters, the combine back to positions,
and blocked local attention (spec/routing.md, steps 4-6; the kernels are in :mod:`._cluster_attention_kernels`).

How it runs on the device:

- ``cluster_attention``: the profile's logit features (``tacl``: LayerNorm of q and k; ``lucidrains``:
  raw q and k, or L2(q) for the keys with shared QK) are the normalization of :mod:`._clustering`
  (the row kernels that ``normalize`` runs), then tiled W x W attention: a thread per query slot,
  a block per (batch · head, cluster, tile of query slots), or per several clusters when the
  windows are small; query rows gathered through ``q_members``, key and value rows through
  ``k_members`` staged in shared-memory slabs, an online softmax (running maximum and sum), no
  W x W logits in global memory.
- ``cluster_attention_vjp``: the forward again (for o and the log-sum-exp), then a query-side and a
  key-side kernel that recompute the logits; the slot gradients go to positions with atomic adds
  (a token can be in several clusters), and the normalization's VJP pulls them back through the
  features.
- ``combine``: member counts and the scatter of o / (count + ε) to positions, both by atomic adds;
  ``combine_vjp`` is a gather.
- ``local_attention`` and its VJP: the same tiling over each query tile's contiguous range of
  visible keys (blocks n - 1 .. n + 1), the key-side backward a gather (no atomics).

The host validates shapes and dtypes on metadata (and NaN/Inf with a counting kernel on the device),
reads the small integer member arrays and padding masks to check them, and launches; NumPy inputs
are copied to the device and the results back, device inputs are used in place and the results
are device arrays. float32 and float64 are each computed in their own dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from refattn.checks import expect_shape, flag, integer_in_range, members_array, padding_mask, shared_keys
from refattn.routing.profiles import Profile, check_configuration, get_profile

from ._clustering import _normalize, _normalize_vjp
from ._kernels import TILE
from ._runtime import Call, Meta, device_view, float_array, host_small, is_device, launch, sequence

__all__ = ["cluster_attention", "cluster_attention_vjp", "combine", "combine_vjp", "local_attention",
           "local_attention_vjp"]

_FORWARD = object()  # the cotangent argument of the checks in a forward call: nothing to check


# ---------------------------------------------------------------- inputs


def _members(members: Any, name: str, batch: int, heads: int, length: int) -> np.ndarray:
    """:func:`refattn.checks.members_array` on the host copy of a (small) member array."""
    return members_array(host_small(members), name, batch, heads, length)


def _device_members(members: Any, host: np.ndarray) -> Any:
    """The validated members as an int64 device array: the input itself when it already is one."""
    if is_device(members) and np.dtype(device_view(members).dtype) == np.int64:
        return device_view(members)
    return cuda.to_device(np.ascontiguousarray(host))


class _Routed(NamedTuple):
    """The validated configuration of one cluster-attention call."""

    profile: Profile
    causal: bool
    shared_qk: bool
    q_members: Any  # (B, H, C, Wq) int64, on the device
    k_members: Any  # (B, H, C, Wk) int64, on the device
    dim_v: int


def routed_inputs(q: Any, k: Any, v: Any, profile: str, causal: bool, shared_qk: bool
                  ) -> tuple[Profile, bool, bool, Meta, Meta]:
    """:func:`refattn.routing.cluster_attention.routed_inputs` on metadata (and device-side NaN counts):
    the profile and its configuration, k against ``shared_qk``, q, k, v. Returns (profile, causal,
    shared_qk, q's metadata, v's metadata)."""
    profile = get_profile(profile)
    causal, shared_qk = flag(causal, "causal"), flag(shared_qk, "shared_qk")
    shared_keys(k, shared_qk)
    check_configuration(profile, causal, shared_qk)
    mq = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = mq.shape
    if k is not None:
        sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    mv = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    return profile, causal, shared_qk, mq, mv


def _routed(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, causal: bool, shared_qk: bool, profile: str,
            do: Any = _FORWARD) -> _Routed:
    """The checks of the reference's cluster attention (``routed_inputs``, the members, then ``do`` in a
    VJP), on metadata; the members go to the device only once everything is valid."""
    profile, causal, shared_qk, mq, mv = routed_inputs(q, k, v, profile, causal, shared_qk)
    batch, heads, length, _ = mq.shape
    host_q = _members(q_members, "q_members", batch, heads, length)
    host_k = _members(k_members, "k_members", batch, heads, length)
    if host_k.shape[2] != host_q.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {host_q.shape[2]} as q_members, "
            f"got shape {host_k.shape}"
        )
    if do is not _FORWARD:
        mdo = float_array(do, "do", rank=5, axes="(B, H, C, W, Dv)")
        expect_shape(mdo, "do", host_q.shape + (mv.shape[3],), "(B, H, C, W, Dv)")
    return _Routed(profile, causal, shared_qk, _device_members(q_members, host_q), _device_members(k_members, host_k),
                   mv.shape[3])


# ---------------------------------------------------------------- step 4: cluster attention


def _features(call: Call, routed: _Routed, q: Any, k: Any, q_hat: Any = None, k_hat: Any = None) -> tuple[Any, Any]:
    """(f_q, f_k), the (B, H, L, D) rows whose dot products are the logits (spec/routing.md, step 4).

    ``q_hat``, ``k_hat``: N(q), N(k) (the profile's normalization) where the caller has them already
    (the routing pipeline routes with them); a needed one that is missing is computed here.
    """
    profile = routed.profile

    def normalized(x: Any, known: Any) -> Any:
        return _normalize(call, x, profile) if known is None else known

    if profile.logits_use_normalized:
        f_q = normalized(q, q_hat)
        return f_q, (f_q if routed.shared_qk else normalized(k, k_hat))
    return q, (normalized(q, q_hat) if routed.shared_qk else k)


def _logit_arguments(call: Call, routed: _Routed, dim: int) -> tuple[int, int, Any, Any]:
    """(causal, self_masked, self_logit, scale) as the kernels take them."""
    profile = routed.profile
    self_masked = routed.shared_qk and profile.self_logit is not None
    scale = 1.0 / math.sqrt(dim) if profile.scaled_logits else 1.0
    return int(routed.causal), int(self_masked), call.scalar(profile.self_logit if self_masked else 0.0), \
        call.scalar(scale)


def _cluster_grid(own: Any, other: Any) -> tuple[int, tuple[int, int]]:
    """(blocks, (threads, groups)) of the cluster kernels, one thread per slot of ``own`` (the query
    members; the key members in the key-side backward), ``other`` the members on the other side.

    A cell is (batch · head, cluster, tile of up to TILE slots); a block holds ``groups`` cells, as
    many as the tiles of ``other`` slots they stage fit in the TILE rows of the shared arrays: one
    unless both windows are at most TILE / 2. Small clusters so share a block instead of each
    leaving most of a warp idle; the CUDA simulator, which pays for every barrier of every block,
    runs them several times faster so.
    """
    batch, heads, clusters, window = own.shape
    threads = min(TILE, window)
    cells = batch * heads * clusters * -(-window // threads)
    groups = min(TILE // max(threads, min(TILE, other.shape[3])), cells)
    return -(-cells // groups), (threads, groups)


def _cluster_forward(call: Call, routed: _Routed, f_q: Any, f_k: Any, v: Any) -> tuple[Any, Any]:
    """(o (B, H, C, Wq, Dv), lse (B, H, C, Wq)) on the device."""
    shape = tuple(routed.q_members.shape)
    o = call.empty(shape + (routed.dim_v,))
    lse = call.empty(shape)
    blocks, block = _cluster_grid(routed.q_members, routed.k_members)
    call.kernels["cluster_fwd_k"][blocks, block](f_q, f_k, v, routed.q_members, routed.k_members,
                                                *_logit_arguments(call, routed, f_q.shape[3]), o, lse)
    return o, lse


def cluster_attention(
    q: Any,
    k: Any,
    v: Any,
    q_members: Any,
    k_members: Any,
    *,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
) -> Any:
    """Dense attention of each cluster's query members to its key members, on the device.

    With f_q, f_k the profile's logit features (``tacl``: LN(q), LN(k), f_k = f_q with shared QK;
    ``lucidrains``: q, k, f_k = q / max(||q||, 1e-12) with shared QK) and s its scale (1 for ``tacl``,
    1/sqrt(D) for ``lucidrains``), for cluster c and query slot w holding position i:

        z_{c,w,u} = s f_q,i · f_k,j      for key slot u holding position j  (-5e4 if j = i,
                                          lucidrains with shared QK)
        o_{c,w}   = sum_u softmax_u(z_{c,w,u}) v_j

    the softmax running over the valid key slots only (not empty, and j <= i when causal).
    An empty query slot (-1) gives o = 0; a query with no valid key gives o = 0 in both profiles.

    Args:
        q: (B, H, L, D) raw queries (the profile's normalization is applied here).
        k: (B, H, L, D) raw keys, or None with ``shared_qk=True`` (the keys are then the queries).
        v: (B, H, L, Dv) values.
        q_members: (B, H, C, Wq) int positions (from ``route``), -1 = empty slot.
        k_members: (B, H, C, Wk) int positions for keys and values (normally q_members with shared QK).
        causal: keys j <= i only, by position.
        shared_qk: keys are derived from q (k must be None).
        profile: ``"tacl"`` or ``"lucidrains"`` (the latter rejects causal with unshared QK).

    Returns:
        o (B, H, C, Wq, Dv) in the inputs' dtype (float32 or float64): a NumPy array for NumPy
        inputs, a device array otherwise. Cost O(B H C Wq Wk (D + Dv)) on the device.
    """
    routed = _routed(q, k, v, q_members, k_members, causal, shared_qk, profile)
    call = Call(q, k, v)
    f_q, f_k = _features(call, routed, call.put(q), call.put(k))
    o, _ = _cluster_forward(call, routed, f_q, f_k, call.put(v))
    return call.out(o)


def cluster_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    q_members: Any,
    k_members: Any,
    do: Any,
    *,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
) -> tuple[Any, Any | None, Any]:
    """Vector-Jacobian product of :func:`cluster_attention` (membership fixed), on the device.

    With p the softmax weights (0 at invalid pairs) and s the logit scale, per cluster:

        dp_{wu} = do_w · v_u,    dz_{wu} = p_{wu} (dp_{wu} - sum_u' p_{wu'} dp_{wu'})
        df_q,w  = s sum_u dz_{wu} f_k,u,   df_k,u = s sum_w dz_{wu} f_q,w,   dv_u = sum_w p_{wu} do_w

    (dz = 0 where the logit is the constant -5e4; sum_u' p dp = do_w · o_w.) The slot gradients are
    summed into their positions (a token in several clusters receives the sum), then pulled back
    through the features: ``tacl`` dq = LN'(q)ᵀ df_q (+ df_k when shared), dk = LN'(k)ᵀ df_k;
    ``lucidrains`` dq = df_q (+ L2'(q)ᵀ df_k when shared), dk = df_k.

    The sums into positions are atomic adds, whose order varies from run to run: results may
    differ between runs in the last bits, within the tolerances of spec/interface.md.

    Args:
        q, k, v, q_members, k_members, causal, shared_qk, profile: as :func:`cluster_attention`.
        do: (B, H, C, Wq, Dv) cotangent of o.

    Returns:
        (dq, dk, dv), each of its input's (B, H, L, ·) shape and the inputs' dtype; dk is None with
        shared QK. Positions in no cluster get zero gradient.
    """
    routed = _routed(q, k, v, q_members, k_members, causal, shared_qk, profile, do)
    call = Call(q, k, v, do)
    grads = _cluster_backward(call, routed, call.put(q), call.put(k), call.put(v), call.put(do))
    return tuple(call.out(g) for g in grads)


def _cluster_backward(call: Call, routed: _Routed, q: Any, k: Any, v: Any, do: Any, q_hat: Any = None,
                      k_hat: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk or None, dv) of device arrays; ``q_hat``, ``k_hat`` as :func:`_features` takes them."""
    profile = routed.profile
    f_q, f_k = _features(call, routed, q, k, q_hat, k_hat)
    o, lse = _cluster_forward(call, routed, f_q, f_k, v)
    arguments = _logit_arguments(call, routed, q.shape[3])
    delta = call.empty(lse.shape)
    dfq = call.zeros(q.shape)
    # tacl with shared QK: both feature gradients pull back through the same LN(q), so they share a buffer
    dfk = dfq if routed.shared_qk and profile.logits_use_normalized else call.zeros(q.shape)
    dv = call.zeros(v.shape)
    blocks, block = _cluster_grid(routed.q_members, routed.k_members)
    call.kernels["cluster_bwd_q_k"][blocks, block](f_q, f_k, v, routed.q_members, routed.k_members, *arguments,
                                                  o, lse, do, delta, dfq)
    blocks, block = _cluster_grid(routed.k_members, routed.q_members)
    call.kernels["cluster_bwd_kv_k"][blocks, block](f_q, f_k, v, routed.q_members, routed.k_members, *arguments,
                                                   lse, do, delta, dfk, dv)
    if profile.logits_use_normalized:
        dq = _normalize_vjp(call, q, dfq, profile)
        return dq, (None if routed.shared_qk else _normalize_vjp(call, k, dfk, profile)), dv
    if routed.shared_qk:
        return _normalize_vjp(call, q, dfk, profile, base=dfq), None, dv
    return dfq, dfk, dv


# ---------------------------------------------------------------- step 5: combine


def _counts(call: Call, members: Any, length: int) -> Any:
    """count[b, h, t] = number of slots holding t, (B, H, L) int64 on the device (atomic adds)."""
    batch, heads = members.shape[:2]
    counts = call.zeros((batch, heads, length), np.int64)
    launch(call.kernels["combine_count_k"], members.size, members, counts)
    return counts


def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> Any:
    """Scatter the cluster outputs back to their positions, averaging over clusters, on the device.

        out[b, h, t] = sum over the slots (c, w) with q_members[b, h, c, w] = t of o[b, h, c, w]
                       / (count[b, h, t] + ε)

    with count[b, h, t] the number of such slots and ε the profile's (1e-2 tacl, 1e-5 lucidrains).
    Empty slots (-1) are ignored, whatever o holds there. Each term is added to its position with an
    atomic add (in an order that varies between runs: the last bits may vary, within tolerance).

    Args:
        o: (B, H, C, W, Dv) cluster outputs (from :func:`cluster_attention`).
        q_members: (B, H, C, W) int positions in [0, length), -1 = empty.
        length: L, the sequence length (>= 1).
        profile: ``"tacl"`` or ``"lucidrains"``.

    Returns:
        out (B, H, L, Dv) in o's dtype; rows of tokens in no cluster (and of padding) are 0.
    """
    profile = get_profile(profile)
    length = integer_in_range(length, "length", low=1)
    mo = float_array(o, "o", rank=5, axes="(B, H, C, W, Dv)")
    host = _members(q_members, "q_members", mo.shape[0], mo.shape[1], length)
    if host.shape != mo.shape[:4]:
        raise ValueError(f"q_members: expected shape (B, H, C, W) = {mo.shape[:4]} (that of o), got {host.shape}")
    call = Call(o)
    return call.out(_combine(call, call.put(o), _device_members(q_members, host), length, profile))


def _combine(call: Call, o: Any, members: Any, length: int, profile: Profile) -> Any:
    """out (B, H, L, Dv) of device o and members (no checks)."""
    out = call.zeros((o.shape[0], o.shape[1], length, o.shape[4]))
    launch(call.kernels["combine_k"], o.size, o, members, _counts(call, members, length),
           call.scalar(profile.combine_eps), out)
    return out


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> Any:
    """Vector-Jacobian product of :func:`combine` (it is linear in o), a gather on the device:

        do[b, h, c, w] = dout[b, h, t] / (count[b, h, t] + ε)   with t = q_members[b, h, c, w],
        do = 0 at empty slots.

    Args:
        q_members: (B, H, C, W) the forward's members; dout: (B, H, L, Dv) cotangent of out.

    Returns:
        do (B, H, C, W, Dv) in dout's dtype.
    """
    profile = get_profile(profile)
    md = float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    batch, heads, length, _ = md.shape
    host = _members(q_members, "q_members", batch, heads, length)
    call = Call(dout)
    return call.out(_combine_vjp(call, _device_members(q_members, host), call.put(dout), profile))


def _combine_vjp(call: Call, members: Any, dout: Any, profile: Profile) -> Any:
    """do (B, H, C, W, Dv) of device members and dout (no checks)."""
    do = call.empty(tuple(members.shape) + (dout.shape[3],))
    launch(call.kernels["combine_vjp_k"], do.size, dout, members, _counts(call, members, dout.shape[2]),
           call.scalar(profile.combine_eps), do)
    return do


# ---------------------------------------------------------------- step 6: local attention


class _Local(NamedTuple):
    block: int  # min(block, L): a block of L or more tokens is one block holding everything
    causal: int
    padded: Any  # (B or 1, L) int64 on the device, nonzero = padding
    scale: float  # 1 / sqrt(D)


def _local(q: Any, k: Any, v: Any, block: int, causal: bool, key_padding_mask: Any, dout: Any = _FORWARD) -> _Local:
    """The reference's local-attention checks (then ``dout`` in a VJP), on metadata and the host copy of
    the mask; the padding flags go to the device only once everything is valid."""
    mq = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = mq.shape
    sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    mv = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    block = integer_in_range(block, "block", low=1)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    if dout is not _FORWARD:
        md = float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
        expect_shape(md, "dout", (batch, heads, length, mv.shape[3]), "(B, H, L, Dv)")
    padded = np.zeros((1, length), dtype=np.int64) if mask is None else mask.astype(np.int64)
    return _Local(min(block, length), int(flag(causal, "causal")), cuda.to_device(padded), 1.0 / math.sqrt(dim))


def _local_grid(length: int, batch_heads: int) -> tuple[int, int]:
    """(blocks, threads): one block per (batch · head, tile of up to TILE positions)."""
    threads = min(TILE, length)
    return batch_heads * ((length + threads - 1) // threads), threads


def _local_forward(call: Call, local: _Local, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """(out (B, H, L, Dv), lse (B, H, L)) on the device."""
    batch, heads, length, _ = q.shape
    out = call.empty((batch, heads, length, v.shape[3]))
    lse = call.empty((batch, heads, length))
    blocks, threads = _local_grid(length, batch * heads)
    call.kernels["local_fwd_k"][blocks, threads](q, k, v, local.padded, local.block, local.causal,
                                                call.scalar(local.scale), out, lse)
    return out, lse


def local_attention(
    q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None
) -> Any:
    """Blocked local attention, on the device.

    With n(i) = floor(i / B), query i sees key j iff n(j) ∈ {n(i) - 1, n(i)} (also n(i) + 1 when
    not causal), j <= i when causal, and neither i nor j is padding:

        out_i = sum_j softmax_j(q_i · k_j / sqrt(D)) v_j    over the keys it sees.

    Edge cases: L need not be a multiple of B (the last block is shorter); B >= L makes one block
    (full attention); a padded query, or one whose keys are all padded, outputs 0.

    Args:
        q, k: (B, H, L, D); v: (B, H, L, Dv).
        block: B, an integer >= 1.
        causal: keys j <= i only.
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        out (B, H, L, Dv) in the inputs' dtype. Cost O(L · 3B · (D + Dv)) per (batch, head).
    """
    local = _local(q, k, v, block, causal, key_padding_mask)
    call = Call(q, k, v)
    out, _ = _local_forward(call, local, call.put(q), call.put(k), call.put(v))
    return call.out(out)


def local_attention_vjp(
    q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False, key_padding_mask: Any = None
) -> tuple[Any, Any, Any]:
    """Vector-Jacobian product of :func:`local_attention`, on the device.

    Per block, with p the weights (0 where not seen) and s = 1/sqrt(D):

        dp_ij = dout_i · v_j,   dz_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'),
        dq_i = s sum_j dz_ij k_j,   dk_j = s sum_i dz_ij q_i,   dv_j = sum_i p_ij dout_i

    the key-side sums running over the (up to three) blocks whose queries see key j: a gather
    (each key row is computed by one thread), so the result is deterministic.

    Returns:
        (dq, dk, dv) of the shapes of q, k, v, in the inputs' dtype.
    """
    local = _local(q, k, v, block, causal, key_padding_mask, dout)
    call = Call(q, k, v, dout)
    dq, dk, dv = _local_backward(call, local, call.put(q), call.put(k), call.put(v), call.put(dout))
    return call.out(dq), call.out(dk), call.out(dv)


def _local_backward(call: Call, local: _Local, q: Any, k: Any, v: Any, dout: Any) -> tuple[Any, Any, Any]:
    batch, heads, length, _ = q.shape
    out, lse = _local_forward(call, local, q, k, v)
    delta = call.empty(lse.shape)
    dq = call.empty(q.shape)
    dk = call.empty(k.shape)
    dv = call.empty(v.shape)
    blocks, threads = _local_grid(length, batch * heads)
    scale = call.scalar(local.scale)
    call.kernels["local_bwd_q_k"][blocks, threads](q, k, v, local.padded, local.block, local.causal, scale, out,
                                                  lse, dout, delta, dq)
    call.kernels["local_bwd_kv_k"][blocks, threads](q, k, v, local.padded, local.block, local.causal, scale, lse,
                                                   dout, delta, dk, dv)
    return dq, dk, dv
