"""Routing attention, the whole pipeline, and its gradient (spec/routing.md, "The pipeline").

    x̂ = normalize(x)                           step 1 (q, and k unless shared)
    S = x̂ μᵀ                                   step 2
    members = route(S, W)                       step 3 (keys share the queries' with shared QK)
    o = cluster_attention(q, k, v, members)     step 4
    out = combine(o, q_members)                 step 5

Cluster membership is discrete: the gradient treats it as fixed (no gradient reaches the
centroids or flows through the similarities).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .cluster_attention import OVERFLOWS as CLUSTER_OVERFLOWS
from .cluster_attention import cluster_attention_core, cluster_attention_vjp_core, routed_inputs
from .combine import combine_core, combine_vjp_core
from .normalize import normalize_core
from .profiles import Profile
from .route import route_core
from .similarity import similarity_core

__all__ = [
    "attention",
    "attention_vjp",
    "default_num_clusters",
    "default_window",
    "check_attention",
    "check_attention_vjp",
    "attention_core",
    "attention_vjp_core",
]


def default_num_clusters(length: int) -> int:
    """C = max(1, round(sqrt(L))): the choice that balances routing, O(L C D), against attention
    inside the clusters, O(L W D) with W = L / C, for O(L^1.5 D) in all.

    (sqrt(L) is never exactly halfway between integers for integer L, so the rounding is unambiguous.)
    """
    length = checks.integer_in_range(length, "length", low=1)
    return max(1, int(round(math.sqrt(length))))


def default_window(length: int, num_clusters: int) -> int:
    """W = ceil(L / C): enough slots for every token on average (C W >= L); always in [1, L]."""
    length = checks.integer_in_range(length, "length", low=1)
    clusters = checks.integer_in_range(num_clusters, "num_clusters", low=1)
    return -(-length // clusters)


def check_attention(
    q: Any, k: Any, v: Any, centroids: Any, window: Any = None, causal: Any = False, shared_qk: Any = False,
    profile: Any = "tacl", key_padding_mask: Any = None,
) -> tuple[Any, Any, Any, Any, int, bool, bool, Profile, Any]:
    """Validate the arguments of :func:`attention`; returns them in that order (``window`` resolved
    to its default when None, the profile as a :class:`~refattn.routing.profiles.Profile`)."""
    q, k, v, causal, shared_qk, profile = routed_inputs(q, k, v, causal, shared_qk, profile)
    batch, heads, length, dim = q.shape
    centroids, key_padding_mask = checks.arrays(centroids=centroids, key_padding_mask=key_padding_mask)
    centroids = checks.centroid_array(centroids, heads, dim)
    if window is None:
        window = default_window(length, centroids.shape[1])
    window = checks.integer_in_range(window, "window", low=1, high=length)
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return q, k, v, centroids, window, causal, shared_qk, profile, mask


def _members(q: Any, k: Any, centroids: Any, window: int, shared_qk: bool, profile: Profile,
             mask: Any) -> tuple[Any, Any]:
    """Steps 1-3: (q_members, k_members), routed by the similarities of the normalized q and k.

    Raises ``ValueError`` if a similarity overflows (the normalized q and k are bounded, the centroids not).
    """
    def routed(x: Any, name: str) -> Any:
        scores = similarity_core(normalize_core(x, profile=profile), centroids)
        checks.check_overflow(scores, f"the similarity of the normalized {name} to the centroids", centroids=centroids)
        return route_core(scores, window, key_padding_mask=mask)

    q_members = routed(q, "q")
    return (q_members, q_members) if shared_qk else (q_members, routed(k, "k"))


# The overflow checks of out, and of dq, dk, dv (refattn.checks.Overflow); the cores check the routing's
# intermediates. out is the combination of the cluster outputs, which average rows of v.
_GRADIENT = "the gradient of the routing attention"
OVERFLOWS = {
    "attention": (checks.Overflow("the combination of the cluster outputs", ("v",)),),
    "attention_vjp": (checks.Overflow(_GRADIENT, ("dout", "v", "q", "k")),
                      checks.Overflow(_GRADIENT, ("dout", "v", "q", "k")), checks.Overflow(_GRADIENT, ("dout",))),
}


def attention_core(
    q: Any, k: Any, v: Any, centroids: Any, *, window: int, causal: bool = False, shared_qk: bool = False,
    profile: Profile, key_padding_mask: Any = None,
) -> Any:
    """:func:`attention` of validated arguments of one floating dtype (``window`` an int), computed
    and returned in that dtype; raises ``ValueError`` when the similarities or the cluster outputs
    overflow it (:func:`attention` checks out, by ``OVERFLOWS``)."""
    q_members, k_members = _members(q, k, centroids, window, shared_qk, profile, key_padding_mask)
    o = cluster_attention_core(q, k, v, q_members, k_members, causal=causal, shared_qk=shared_qk, profile=profile)
    checks.check_overflows(o, CLUSTER_OVERFLOWS["cluster_attention"], q=q, k=k)
    return combine_core(o, q_members, q.shape[2], profile=profile)


def attention(
    q: Any,
    k: Any,
    v: Any,
    centroids: Any,
    *,
    window: int | None = None,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
    key_padding_mask: Any = None,
) -> np.ndarray:
    """Routing attention: every token attends to the tokens routed to the same centroid.

    1. q̂ = normalize(q), k̂ = normalize(k) (profile's normalization; with shared QK only q̂);
    2. S_q = q̂ μᵀ, S_k = k̂ μᵀ;
    3. q_members = route(S_q, W), k_members = route(S_k, W) (= q_members with shared QK);
       padded tokens are never routed;
    4. o = cluster_attention(q, k, v, q_members, k_members) (``tacl``: logits LN(q)·LN(k);
       ``lucidrains``: q·k/sqrt(D), q·k̂/sqrt(D) and a self logit of -5e4 with shared QK);
    5. out = combine(o, q_members, L): the mean over a token's clusters, / (count + ε).

    Edge cases: tokens in no cluster output 0 (W·C >= L does not guarantee coverage, since a
    token can be taken by several centroids); padded tokens output 0; L = 1 gives W = 1 and
    out = (attention of the token to itself) / (1 + ε) — with lucidrains shared QK that is v / (1 + ε)
    as the −5e4 self logit is the only one.

    Args:
        q: (B, H, L, D); k: (B, H, L, D) or None with ``shared_qk=True``; v: (B, H, L, Dv).
        centroids: (H, C, D) the means (``CentroidState.means``).
        window: W in [1, L]; default ceil(L / C).
        causal: keys j <= i by position inside each cluster.
        shared_qk: keys are the queries (k must be None).
        profile: ``"tacl"`` (default) or ``"lucidrains"`` (rejects causal with unshared QK: that
            package adds learned memory key/values there, which refattn does not model).
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        out (B, H, L, Dv) float64. Cost O(B H (L C D + C W² (D + Dv))) = O(L^1.5 D) with C = sqrt(L),
        W = L / C; memory O(B H (L C + C W D)) plus bounded (chunk, W, W) blocks.
    """
    q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask = check_attention(
        q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask
    )
    q, k, v, centroids = as_float64(q, k, v, centroids)
    out = attention_core(q, k, v, centroids, window=window, causal=causal, shared_qk=shared_qk, profile=profile,
                         key_padding_mask=key_padding_mask)
    checks.check_overflows(out, OVERFLOWS["attention"], v=v)
    return out


def check_attention_vjp(
    q: Any, k: Any, v: Any, centroids: Any, dout: Any, window: Any = None, causal: Any = False,
    shared_qk: Any = False, profile: Any = "tacl", key_padding_mask: Any = None,
) -> tuple[Any, Any, Any, Any, Any, int, bool, bool, Profile, Any]:
    """Validate the arguments of :func:`attention_vjp`; returns them in that order."""
    q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask = check_attention(
        q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask
    )
    dout = checks.float_array(checks.as_array(dout, "dout"), "dout", rank=4, axes="(B, H, L, Dv)")
    checks.expect_shape(dout, "dout", v.shape, "(B, H, L, Dv)")
    return q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask


def attention_vjp_core(
    q: Any, k: Any, v: Any, centroids: Any, dout: Any, *, window: int, causal: bool = False,
    shared_qk: bool = False, profile: Profile, key_padding_mask: Any = None,
) -> tuple[Any, Any, Any]:
    """:func:`attention_vjp` of validated arguments of one floating dtype, computed and returned in
    that dtype; raises ``ValueError`` when the routing overflows it (:func:`attention_vjp` checks the
    gradients, by ``OVERFLOWS``)."""
    q_members, k_members = _members(q, k, centroids, window, shared_qk, profile, key_padding_mask)
    do = combine_vjp_core(q_members, dout, profile=profile)
    dq, dk, dv = cluster_attention_vjp_core(
        q, k, v, q_members, k_members, do, causal=causal, shared_qk=shared_qk, profile=profile
    )
    return dq, dk, dv


def attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    centroids: Any,
    dout: Any,
    *,
    window: int | None = None,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
    key_padding_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Vector-Jacobian product of :func:`attention` with the membership held fixed:

        do = combine_vjp(q_members, dout);   (dq, dk, dv) = cluster_attention_vjp(q, k, v, members, do)

    The routing (normalize → similarity → route) is discrete and passes no gradient; q and k get
    gradient only through the logits. Exact wherever no similarity tie sits at a top-W boundary.

    Returns:
        (dq, dk, dv) float64 of the shapes of q, k, v; dk is None with shared QK.
    """
    q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask = check_attention_vjp(
        q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask
    )
    q, k, v, centroids, dout = as_float64(q, k, v, centroids, dout)
    grads = attention_vjp_core(q, k, v, centroids, dout, window=window, causal=causal, shared_qk=shared_qk,
                               profile=profile, key_padding_mask=key_padding_mask)
    checks.check_overflows(grads, OVERFLOWS["attention_vjp"], q=q, k=k, v=v, dout=dout)
    return grads
