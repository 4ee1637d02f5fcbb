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

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .indexing import gather, scatter_add
from .normalize import normalize_core, normalize_vjp_core
from .profiles import Profile, check_configuration, get_profile

__all__ = [
    "cluster_attention",
    "cluster_attention_vjp",
    "check_cluster_attention",
    "check_cluster_attention_vjp",
    "cluster_attention_core",
    "cluster_attention_vjp_core",
    "routed_inputs",
]

_CHUNK_ELEMENTS = 1 << 22  # logits entries (B * H * chunk * Wq * Wk) per chunk of clusters


def routed_inputs(
    q: Any, k: Any, v: Any, causal: Any, shared_qk: Any, profile: Any
) -> tuple[Any, Any, Any, bool, bool, Profile]:
    """The checks shared by the routed-attention entry points: q (B, H, L, D), k (B, H, L, D) or None
    as ``shared_qk`` asks, v (B, H, L, Dv), the flags, and the profile and its configuration.

    Returns (q, k, v, causal, shared_qk, profile), the order of its arguments: the arrays unchanged
    (NumPy or CuPy), the profile as a :class:`~refattn.routing.profiles.Profile`.
    """
    profile = get_profile(profile)
    causal, shared_qk = checks.flag(causal, "causal"), checks.flag(shared_qk, "shared_qk")
    checks.shared_keys(k, shared_qk)
    check_configuration(profile, causal, shared_qk)
    q, k, v = checks.arrays(q=q, k=k, v=v)
    q = checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if k is not None:
        k = checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    return q, k, v, causal, shared_qk, profile


def check_cluster_attention(
    q: Any, k: Any, v: Any, q_members: Any, k_members: Any, causal: Any = False, shared_qk: Any = False,
    profile: Any = "tacl",
) -> tuple[Any, Any, Any, Any, Any, bool, bool, Profile]:
    """Validate the arguments of :func:`cluster_attention`; returns them in that order (members as int64)."""
    q, k, v, causal, shared_qk, profile = routed_inputs(q, k, v, causal, shared_qk, profile)
    batch, heads, length, _ = q.shape
    q_members, k_members = checks.arrays(q_members=q_members, k_members=k_members)
    q_members = checks.members_array(q_members, "q_members", batch, heads, length)
    k_members = checks.members_array(k_members, "k_members", batch, heads, length)
    if k_members.shape[2] != q_members.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {q_members.shape[2]} as q_members, "
            f"got shape {k_members.shape}"
        )
    return q, k, v, q_members, k_members, causal, shared_qk, profile


def _features(q: Any, k: Any, shared_qk: bool, profile: Profile) -> tuple[Any, Any]:
    """(f_q, f_k), the (B, H, L, D) vectors whose dot products are the logits."""
    if profile.logits_use_normalized:
        f_q = normalize_core(q, profile=profile)
        f_k = f_q if shared_qk else normalize_core(k, profile=profile)
    else:
        f_q = q
        f_k = normalize_core(q, profile=profile) if shared_qk else k
    return f_q, f_k


def _chunks(q_members: Any, k_members: Any) -> Iterator[slice]:
    batch, heads, clusters, wq = q_members.shape
    wk = k_members.shape[3]
    size = max(1, _CHUNK_ELEMENTS // (batch * heads * wq * wk))
    for c0 in range(0, clusters, size):
        yield slice(c0, min(clusters, c0 + size))


class _Block(NamedTuple):
    fq: Any  # (B, H, c, Wq, D) gathered query features
    fk: Any  # (B, H, c, Wk, D) gathered key features
    vg: Any  # (B, H, c, Wk, Dv) gathered values
    probs: Any  # (B, H, c, Wq, Wk), 0 at invalid pairs and in rows without a valid key
    fixed: Any  # (B, H, c, Wq, Wk) bool: logits replaced by the self-logit constant, or None


def _block(f_q: Any, f_k: Any, v: Any, qm: Any, km: Any, causal: bool, shared_qk: bool, profile: Profile) -> _Block:
    """Features, values and softmax weights of the clusters whose members are qm, km (a chunk)."""
    xp = checks.array_namespace(f_q, f_k, v)
    fq, fk, vg = gather(f_q, qm), gather(f_k, km), gather(v, km)
    logits = xp.einsum("bhcid,bhcjd->bhcij", fq, fk, optimize=True)
    if profile.scaled_logits:
        logits *= 1.0 / math.sqrt(f_q.shape[3])
    qpos, kpos = qm[..., :, None], km[..., None, :]
    valid = (qpos >= 0) & (kpos >= 0)
    if causal:
        valid &= kpos <= qpos
    fixed = None
    if shared_qk and profile.self_logit is not None:
        fixed = valid & (kpos == qpos)
        logits[fixed] = profile.self_logit
    logits[~valid] = -np.inf
    peak = logits.max(axis=-1, keepdims=True)
    peak[~xp.isfinite(peak)] = 0.0  # rows without a valid key: all weights exp(-inf) = 0
    weights = xp.exp(logits - peak, out=logits)
    total = weights.sum(axis=-1, keepdims=True)
    total[total == 0] = 1.0
    weights /= total
    return _Block(fq, fk, vg, weights, fixed)


def cluster_attention_core(
    q: Any, k: Any, v: Any, q_members: Any, k_members: Any, *, causal: bool = False, shared_qk: bool = False,
    profile: Profile,
) -> Any:
    """:func:`cluster_attention` of validated arguments (q, k, v of one floating dtype, members int64,
    ``profile`` a :class:`~refattn.routing.profiles.Profile`), computed and returned in that dtype."""
    xp = checks.array_namespace(q, v)
    f_q, f_k = _features(q, k, shared_qk, profile)
    batch, heads, clusters, wq = q_members.shape
    out = xp.empty((batch, heads, clusters, wq, v.shape[3]), dtype=v.dtype)
    for part in _chunks(q_members, k_members):
        block = _block(f_q, f_k, v, q_members[:, :, part], k_members[:, :, part], causal, shared_qk, profile)
        out[:, :, part] = xp.einsum("bhcij,bhcjd->bhcid", block.probs, block.vg, optimize=True)
    return out


_GRADIENT = "the gradient of the cluster attention"
OVERFLOWS = {
    "cluster_attention": (checks.Overflow("the cluster attention", ("q", "k")),),
    "cluster_attention_vjp": (checks.Overflow(_GRADIENT, ("do", "v", "q", "k")),
                              checks.Overflow(_GRADIENT, ("do", "v", "q", "k")), checks.Overflow(_GRADIENT, ("do",))),
}


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
    q, k, v, q_members, k_members, causal, shared_qk, profile = check_cluster_attention(
        q, k, v, q_members, k_members, causal, shared_qk, profile
    )
    q, k, v = as_float64(q, k, v)
    o = cluster_attention_core(q, k, v, q_members, k_members, causal=causal, shared_qk=shared_qk, profile=profile)
    checks.check_overflows(o, OVERFLOWS["cluster_attention"], q=q, k=k)
    return o


def check_cluster_attention_vjp(
    q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, causal: Any = False, shared_qk: Any = False,
    profile: Any = "tacl",
) -> tuple[Any, Any, Any, Any, Any, Any, bool, bool, Profile]:
    """Validate the arguments of :func:`cluster_attention_vjp`; returns them in that order."""
    q, k, v, q_members, k_members, causal, shared_qk, profile = check_cluster_attention(
        q, k, v, q_members, k_members, causal, shared_qk, profile
    )
    do = checks.float_array(checks.as_array(do, "do"), "do", rank=5, axes="(B, H, C, W, Dv)")
    checks.expect_shape(do, "do", q_members.shape + (v.shape[3],), "(B, H, C, W, Dv)")
    return q, k, v, q_members, k_members, do, causal, shared_qk, profile


def cluster_attention_vjp_core(
    q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, *, causal: bool = False,
    shared_qk: bool = False, profile: Profile,
) -> tuple[Any, Any, Any]:
    """:func:`cluster_attention_vjp` of validated arguments of one floating dtype, computed and
    returned in that dtype."""
    xp = checks.array_namespace(q, v, do)
    length, dim = q.shape[2], q.shape[3]
    f_q, f_k = _features(q, k, shared_qk, profile)
    scale = 1.0 / math.sqrt(dim) if profile.scaled_logits else 1.0
    dfq = xp.zeros_like(f_q)
    dfk = xp.zeros_like(f_k)
    dv = xp.zeros_like(v)
    for part in _chunks(q_members, k_members):
        qm, km = q_members[:, :, part], k_members[:, :, part]
        block = _block(f_q, f_k, v, qm, km, causal, shared_qk, profile)
        dob = do[:, :, part]
        dp = xp.einsum("bhcid,bhcjd->bhcij", dob, block.vg, optimize=True)
        dz = block.probs * (dp - xp.sum(block.probs * dp, axis=-1, keepdims=True))
        if block.fixed is not None:
            dz[block.fixed] = 0.0
        dfq += scatter_add(scale * xp.einsum("bhcij,bhcjd->bhcid", dz, block.fk, optimize=True), qm, length)
        dfk += scatter_add(scale * xp.einsum("bhcij,bhcid->bhcjd", dz, block.fq, optimize=True), km, length)
        dv += scatter_add(xp.einsum("bhcij,bhcid->bhcjd", block.probs, dob, optimize=True), km, length)
    if profile.logits_use_normalized:
        if shared_qk:
            return normalize_vjp_core(q, dfq + dfk, profile=profile), None, dv
        return normalize_vjp_core(q, dfq, profile=profile), normalize_vjp_core(k, dfk, profile=profile), dv
    if shared_qk:
        return dfq + normalize_vjp_core(q, dfk, profile=profile), None, dv
    return dfq, dfk, dv


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
    q, k, v, q_members, k_members, do, causal, shared_qk, profile = check_cluster_attention_vjp(
        q, k, v, q_members, k_members, do, causal, shared_qk, profile
    )
    q, k, v, do = as_float64(q, k, v, do)
    dq, dk, dv = cluster_attention_vjp_core(
        q, k, v, q_members, k_members, do, causal=causal, shared_qk=shared_qk, profile=profile
    )
    checks.check_overflows((dq, dk, dv), OVERFLOWS["cluster_attention_vjp"], q=q, k=k, v=v, do=do)
    return dq, dk, dv
