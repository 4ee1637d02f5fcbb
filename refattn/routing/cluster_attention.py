"""Routing step 4: dense attention inside every cluster (spec/routing.md, step 4).

For cluster c with query members Q_c = q_members[b, h, c] and key members K_c = k_members[b, h, c]
(position lists, -1 = empty slot), query i ∈ Q_c attends to the keys j ∈ K_c that are valid:
j is not an empty slot, and j <= i by *position* when causal. Keys outside the query's cluster are
never seen. The logit features are the profile's:

- ``tacl``: f_q = LN(q), f_k = LN(k) (f_k = f_q with shared QK); z_ij = f_q,i · f_k,j (no 1/sqrt(D));
- ``lucidrains``: f_q = q, f_k = k (f_k = q / max(||q||, 1e-12) with shared QK);
  z_ij = f_q,i · f_k,j / sqrt(D); with shared QK z_ii = -5e4 (a token sees itself only when
  nothing else is left).

Then o_{c,i} = sum_j softmax_j(z_ij) v_j over the valid j; a query slot with no valid key (or an
empty query slot) gives o = 0. Clusters are processed in chunks so that the (chunk, W, W) logits
stay small; no L x L array is ever built.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from refattn._validation import expect_shape, float_array

from ._checks import members_array, routed_inputs
from ._indexing import gather, scatter_add
from .normalize import _normalize, _normalize_vjp
from .profiles import Profile

__all__ = ["cluster_attention", "cluster_attention_vjp"]

_CHUNK_ELEMENTS = 1 << 22  # logits entries (B * H * chunk * Wq * Wk) per chunk of clusters


class _Inputs(NamedTuple):
    q: np.ndarray
    k: np.ndarray | None
    v: np.ndarray
    q_members: np.ndarray
    k_members: np.ndarray
    causal: bool
    shared_qk: bool
    profile: Profile


def _inputs(q, k, v, q_members, k_members, causal, shared_qk, profile) -> _Inputs:
    spec, causal, shared_qk, q, k, v = routed_inputs(q, k, v, profile, causal, shared_qk)
    batch, heads, length, dim = q.shape
    q_members = members_array(q_members, "q_members", batch, heads, length)
    k_members = members_array(k_members, "k_members", batch, heads, length)
    if k_members.shape[2] != q_members.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {q_members.shape[2]} as q_members, "
            f"got shape {k_members.shape}"
        )
    return _Inputs(q, k, v, q_members, k_members, causal, shared_qk, spec)


def _features(inputs: _Inputs) -> tuple[np.ndarray, np.ndarray]:
    """(f_q, f_k), the (B, H, L, D) vectors whose dot products are the logits."""
    spec, q, k = inputs.profile, inputs.q, inputs.k
    if spec.logits_use_normalized:
        f_q = _normalize(q, spec)
        f_k = f_q if inputs.shared_qk else _normalize(k, spec)
    else:
        f_q = q
        f_k = _normalize(q, spec) if inputs.shared_qk else k
    return f_q, f_k


def _chunks(inputs: _Inputs) -> Iterator[slice]:
    batch, heads, clusters, wq = inputs.q_members.shape
    wk = inputs.k_members.shape[3]
    size = max(1, _CHUNK_ELEMENTS // (batch * heads * wq * wk))
    for c0 in range(0, clusters, size):
        yield slice(c0, min(clusters, c0 + size))


class _Block(NamedTuple):
    fq: np.ndarray  # (B, H, c, Wq, D) gathered query features
    fk: np.ndarray  # (B, H, c, Wk, D) gathered key features
    vg: np.ndarray  # (B, H, c, Wk, Dv) gathered values
    probs: np.ndarray  # (B, H, c, Wq, Wk), 0 at invalid pairs and in rows without a valid key
    fixed: np.ndarray | None  # (B, H, c, Wq, Wk) bool: logits replaced by the self-logit constant


def _block(inputs: _Inputs, f_q: np.ndarray, f_k: np.ndarray, part: slice) -> _Block:
    qm = inputs.q_members[:, :, part]
    km = inputs.k_members[:, :, part]
    fq, fk, vg = gather(f_q, qm), gather(f_k, km), gather(inputs.v, km)
    logits = np.einsum("bhcid,bhcjd->bhcij", fq, fk, optimize=True)
    if inputs.profile.scaled_logits:
        logits *= 1.0 / np.sqrt(inputs.q.shape[3])
    qpos, kpos = qm[..., :, None], km[..., None, :]
    valid = (qpos >= 0) & (kpos >= 0)
    if inputs.causal:
        valid &= kpos <= qpos
    fixed = None
    if inputs.shared_qk and inputs.profile.self_logit is not None:
        fixed = valid & (kpos == qpos)
        logits[fixed] = inputs.profile.self_logit
    logits[~valid] = -np.inf
    peak = logits.max(axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0.0  # rows without a valid key: all weights exp(-inf) = 0
    weights = np.exp(logits - peak, out=logits)
    total = weights.sum(axis=-1, keepdims=True)
    total[total == 0] = 1.0
    weights /= total
    return _Block(fq, fk, vg, weights, fixed)


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
) -> np.ndarray:
    """Dense attention of each cluster's query members to its key members.

    With f_q, f_k the profile's logit features (module docstring) and s its scale (1 for
    ``tacl``, 1/sqrt(D) for ``lucidrains``), for cluster c and query slot w holding position i:

        z_{c,w,u} = s f_q,i · f_k,j      for key slot u holding position j  (-5e4 if j = i,
                                          lucidrains with shared QK)
        o_{c,w}   = sum_u softmax_u(z_{c,w,u}) v_j

    the softmax running over the valid key slots only (not empty, and j <= i when causal).

    Edge cases: an empty query slot (-1) gives o = 0; a query with no valid key (possible when
    causal with unshared QK, the cluster's keys all lying after it) gives o = 0 in both profiles.
    (lucidrains itself gives a uniform average over masked keys there; with its supported
    configurations and no padding that never happens.)

    Args:
        q: (B, H, L, D) raw queries (the profile's normalization is applied here).
        k: (B, H, L, D) raw keys, or None with ``shared_qk=True`` (the keys are then the queries).
        v: (B, H, L, Dv) values.
        q_members: (B, H, C, Wq) int positions (from :func:`route`), -1 = empty slot.
        k_members: (B, H, C, Wk) int positions for keys and values; with shared QK this is
            normally q_members.
        causal: keys j <= i only, by position.
        shared_qk: keys are derived from q (k must be None).
        profile: ``"tacl"`` or ``"lucidrains"`` (the latter rejects causal with unshared QK).

    Returns:
        o (B, H, C, Wq, Dv) float64. Cost O(B H C Wq Wk (D + Dv)).
    """
    inputs = _inputs(q, k, v, q_members, k_members, causal, shared_qk, profile)
    f_q, f_k = _features(inputs)
    batch, heads, clusters, wq = inputs.q_members.shape
    out = np.empty((batch, heads, clusters, wq, inputs.v.shape[3]))
    for part in _chunks(inputs):
        block = _block(inputs, f_q, f_k, part)
        out[:, :, part] = np.einsum("bhcij,bhcjd->bhcid", block.probs, block.vg, optimize=True)
    return out


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
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Vector-Jacobian product of :func:`cluster_attention` (membership fixed).

    With p the softmax weights (0 at invalid pairs) and s the logit scale, per cluster:

        dp_{wu} = do_w · v_u,    dz_{wu} = p_{wu} (dp_{wu} - sum_u' p_{wu'} dp_{wu'})
        df_q,w  = s sum_u dz_{wu} f_k,u,   df_k,u = s sum_w dz_{wu} f_q,w,   dv_u = sum_w p_{wu} do_w

    (dz = 0 where the logit is the constant -5e4.) The slot gradients are summed into their
    positions (a token in several clusters receives the sum), then pulled back through the
    features: ``tacl`` dq = LN'(q)ᵀ df_q (+ df_k when shared), dk = LN'(k)ᵀ df_k; ``lucidrains``
    dq = df_q (+ L2'(q)ᵀ df_k when shared), dk = df_k.

    Returns:
        (dq, dk, dv), each of its input's (B, H, L, ·) shape, float64; dk is None with shared QK.
        Positions in no cluster get zero gradient.
    """
    inputs = _inputs(q, k, v, q_members, k_members, causal, shared_qk, profile)
    batch, heads, length, dim = inputs.q.shape
    do = float_array(do, "do", rank=5, axes="(B, H, C, W, Dv)")
    expect_shape(do, "do", inputs.q_members.shape + (inputs.v.shape[3],), "(B, H, C, W, Dv)")
    f_q, f_k = _features(inputs)
    scale = 1.0 / np.sqrt(dim) if inputs.profile.scaled_logits else 1.0
    dfq = np.zeros_like(f_q)
    dfk = np.zeros_like(f_k)
    dv = np.zeros_like(inputs.v)
    for part in _chunks(inputs):
        block = _block(inputs, f_q, f_k, part)
        dob = do[:, :, part]
        dp = np.einsum("bhcid,bhcjd->bhcij", dob, block.vg, optimize=True)
        dz = block.probs * (dp - np.sum(block.probs * dp, axis=-1, keepdims=True))
        if block.fixed is not None:
            dz[block.fixed] = 0.0
        qm, km = inputs.q_members[:, :, part], inputs.k_members[:, :, part]
        dfq += scatter_add(scale * np.einsum("bhcij,bhcjd->bhcid", dz, block.fk, optimize=True), qm, length)
        dfk += scatter_add(scale * np.einsum("bhcij,bhcid->bhcjd", dz, block.fq, optimize=True), km, length)
        dv += scatter_add(np.einsum("bhcij,bhcid->bhcjd", block.probs, dob, optimize=True), km, length)
    spec = inputs.profile
    if spec.logits_use_normalized:
        if inputs.shared_qk:
            return _normalize_vjp(inputs.q, dfq + dfk, spec), None, dv
        return _normalize_vjp(inputs.q, dfq, spec), _normalize_vjp(inputs.k, dfk, spec), dv
    if inputs.shared_qk:
        return dfq + _normalize_vjp(inputs.q, dfk, spec), None, dv
    return dfq, dfk, dv
