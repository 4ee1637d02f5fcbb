"""Routing attention (spec/routing.md) on Numba-CUDA kernels: the ``routing`` namespace of spec/interface.md.

The steps live in two modules: :mod:`._clustering` (normalize, similarity, route, assign, the
centroid update and the commitment loss: everything that decides and maintains the clusters) and
:mod:`._cluster_attention` (attention inside the clusters, the combine back to positions, and local
attention). ``attention`` and ``attention_vjp`` compose their device-side steps exactly as the
reference composes its own, with one upload of the inputs and one download of the results; the
normalized q and k that route are also the logit features of the cluster attention (the same
function of the same input), so they are computed once.
``init_centroids`` draws from the caller's NumPy generator on the host, exactly as the reference
(spec/interface.md exempts it from cross-backend comparison).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from refattn.checks import expect_shape, integer_in_range, padding_mask
from refattn.routing import CentroidState, default_num_clusters, default_window
from refattn.routing import init_centroids as _reference_init_centroids
from refattn.routing.profiles import Profile

from ._cluster_attention import (
    _cluster_backward,
    _cluster_forward,
    _combine,
    _combine_vjp,
    _features,
    _Routed,
    cluster_attention,
    cluster_attention_vjp,
    combine,
    combine_vjp,
    local_attention,
    local_attention_vjp,
    routed_inputs,
)
from ._clustering import (
    _centroids,
    _normalize,
    _padded,
    _route,
    _similarity,
    assign,
    commitment_loss,
    commitment_loss_vjp,
    normalize,
    normalize_vjp,
    route,
    similarity,
    similarity_vjp,
    update_centroids,
)
from ._runtime import Call, Meta, float_array, host_small

__all__ = ["normalize", "normalize_vjp", "similarity", "similarity_vjp", "route", "cluster_attention",
           "cluster_attention_vjp", "combine", "combine_vjp", "local_attention", "local_attention_vjp", "assign",
           "CentroidState", "init_centroids", "update_centroids", "commitment_loss", "commitment_loss_vjp",
           "attention", "attention_vjp", "default_num_clusters", "default_window"]


class _Pipeline(NamedTuple):
    """The validated configuration of one ``attention`` call."""

    profile: Profile
    causal: bool
    shared_qk: bool
    window: int
    mask: Any  # (B, L) bool on the host, or None
    dim_v: int


def _pipeline(q: Any, k: Any, v: Any, centroids: Any, window: int | None, causal: bool, shared_qk: bool,
              profile: str, key_padding_mask: Any) -> _Pipeline:
    """The reference's checks, in its order (the profile and its configuration, q, k, v, the
    centroids, the window, the mask), on metadata and device-side NaN counts."""
    profile, causal, shared_qk, mq, mv = routed_inputs(q, k, v, profile, causal, shared_qk)
    batch, heads, length, dim = mq.shape
    clusters = _centroids(centroids, heads, dim).shape[1]
    window = default_window(length, clusters) if window is None else window
    window = integer_in_range(window, "window", low=1, high=length)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    return _Pipeline(profile, causal, shared_qk, window, mask, mv.shape[3])


def _routed(call: Call, pipeline: _Pipeline, q: Any, k: Any, centroids: Any) -> tuple[_Routed, Any, Any]:
    """Steps 1-3 on the device: members = route(normalize(x) μᵀ, W) for the queries and (unless
    shared) the keys. Also returns normalize(q) and normalize(k) (None when shared): the logit
    features of step 4 are made of the same normalization, so the attention reuses them."""
    profile = pipeline.profile
    batch, _, length, _ = q.shape
    padded = _padded(call, pipeline.mask, batch, length)
    q_hat = _normalize(call, q, profile)
    k_hat = None if pipeline.shared_qk else _normalize(call, k, profile)

    def members(x_hat: Any) -> Any:
        return _route(call, _similarity(call, x_hat, centroids), pipeline.window, padded)

    q_members = members(q_hat)
    k_members = q_members if pipeline.shared_qk else members(k_hat)
    return _Routed(profile, pipeline.causal, pipeline.shared_qk, q_members, k_members, pipeline.dim_v), q_hat, k_hat


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
) -> Any:
    """Routing attention: every token attends to the tokens routed to the same centroid.

        q_members = route(normalize(q) μᵀ, W), k_members likewise (= q_members with shared QK);
        o = cluster_attention(q, k, v, q_members, k_members);   out = combine(o, q_members, L)

    Same arguments, edge cases and defaults as :func:`refattn.routing.attention` (W = ceil(L / C) when
    ``window`` is None). Returns out (B, H, L, Dv) in the compute dtype: a NumPy array for NumPy
    inputs, otherwise the kind of the device input.
    """
    pipeline = _pipeline(q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    call = Call(q, k, v, centroids)
    qd, kd, vd = call.put(q), call.put(k), call.put(v)
    routed, q_hat, k_hat = _routed(call, pipeline, qd, kd, call.put(centroids))
    f_q, f_k = _features(call, routed, qd, kd, q_hat, k_hat)
    o, _ = _cluster_forward(call, routed, f_q, f_k, vd)
    return call.out(_combine(call, o, routed.q_members, qd.shape[2], pipeline.profile))


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
) -> tuple[Any, Any, Any]:
    """Vector-Jacobian product of :func:`attention` with the membership held fixed:

        do = combine_vjp(q_members, dout);   (dq, dk, dv) = cluster_attention_vjp(q, k, v, members, do)

    Returns (dq, dk, dv) of the shapes of q, k, v; dk is None with shared QK.
    """
    pipeline = _pipeline(q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    meta = float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    expect_shape(meta, "dout", Meta(v).shape, "(B, H, L, Dv)")  # v itself is checked by _pipeline
    call = Call(q, k, v, centroids, dout)
    qd, kd, vd = call.put(q), call.put(k), call.put(v)
    routed, q_hat, k_hat = _routed(call, pipeline, qd, kd, call.put(centroids))
    do = _combine_vjp(call, routed.q_members, call.put(dout), pipeline.profile)
    dq, dk, dv = _cluster_backward(call, routed, qd, kd, vd, do, q_hat, k_hat)
    return call.out(dq), call.out(dk), call.out(dv)


def init_centroids(num_heads: int, num_clusters: int, dim: int, *, rng: Any, profile: str = "tacl") -> CentroidState:
    """The reference's ``init_centroids`` (host NumPy, the caller's generator); not compared across backends."""
    return _reference_init_centroids(num_heads, num_clusters, dim, rng=rng, profile=profile)
