"""Routing attention end to end on the device (:mod:`refattn.routing.attention`, whose checks it runs).

How it differs from the reference: the steps' device cores are chained on device arrays with one
upload of the inputs and one download of the result; the normalized q and k that route are also
the logit features of the cluster attention (the same function of the same input), so they are
computed once; the overflow checks are counted on the device and read at the end of the call.
"""

from __future__ import annotations

from typing import Any

from refattn.routing.attention import (
    OVERFLOWS,
    check_attention,
    check_attention_vjp,
    default_num_clusters,
    default_window,
)
from refattn.routing.cluster_attention import OVERFLOWS as CLUSTER_OVERFLOWS
from refattn.routing.profiles import Profile

from ..runtime import Call, intake
from .cluster_attention import Routed, cluster_backward, cluster_forward, features
from .combine import combine_core, combine_vjp_core
from .normalize import normalize_core
from .route import padding_flags, route_core
from .similarity import similarity_core

__all__ = ["attention", "attention_vjp", "attention_core", "attention_vjp_core", "default_num_clusters",
           "default_window"]


def routed(call: Call, q: Any, k: Any, v: Any, centroids: Any, window: int, causal: bool, shared_qk: bool,
           profile: Profile, mask: Any) -> tuple[Routed, Any, Any]:
    """Steps 1-3: the members of q and (unless shared) k, and their normalizations (k's None when shared)."""
    padded = padding_flags(call, mask, q.shape[0], q.shape[2])
    q_hat = normalize_core(call, q, profile=profile)
    k_hat = None if shared_qk else normalize_core(call, k, profile=profile)

    def members(x_hat: Any, name: str) -> Any:
        scores = similarity_core(call, x_hat, centroids)
        call.watch(scores, f"the similarity of the normalized {name} to the centroids", centroids=centroids)
        return route_core(call, scores, window, padded)

    q_members = members(q_hat, "q")
    k_members = q_members if shared_qk else members(k_hat, "k")
    return Routed(profile, causal, shared_qk, q_members, k_members, v.shape[3]), q_hat, k_hat


def attention_core(call: Call, q: Any, k: Any, v: Any, centroids: Any, *, window: int, causal: bool = False,
                   shared_qk: bool = False, profile: Profile, key_padding_mask: Any = None) -> Any:
    """out (B, H, L, Dv) on the device."""
    route, q_hat, k_hat = routed(call, q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    o, _ = cluster_forward(call, route, *features(call, route, q, k, q_hat, k_hat), v)
    call.watch_rules(o, CLUSTER_OVERFLOWS["cluster_attention"], q=q, k=k)
    out = combine_core(call, o, route.q_members, q.shape[2], profile=profile)
    call.watch_rules(out, OVERFLOWS["attention"], v=v)
    return out


def attention(q: Any, k: Any, v: Any, centroids: Any, *, window: int | None = None, causal: bool = False,
              shared_qk: bool = False, profile: str = "tacl", key_padding_mask: Any = None) -> Any:
    """:func:`refattn.routing.attention` on the device."""
    call, (q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask) = intake(
        check_attention, q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    return call.out(attention_core(call, q, k, v, centroids, window=window, causal=causal, shared_qk=shared_qk,
                                   profile=profile, key_padding_mask=key_padding_mask))


def attention_vjp_core(call: Call, q: Any, k: Any, v: Any, centroids: Any, dout: Any, *, window: int,
                       causal: bool = False, shared_qk: bool = False, profile: Profile,
                       key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk or None, dv) on the device, the membership held fixed."""
    route, q_hat, k_hat = routed(call, q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    do = combine_vjp_core(call, route.q_members, dout, profile=profile)
    dq, dk, dv = cluster_backward(call, route, q, k, v, do, q_hat, k_hat)
    call.watch_rules((dq, dk, dv), OVERFLOWS["attention_vjp"], q=q, k=k, v=v, dout=dout)
    return dq, dk, dv


def attention_vjp(q: Any, k: Any, v: Any, centroids: Any, dout: Any, *, window: int | None = None,
                  causal: bool = False, shared_qk: bool = False, profile: str = "tacl",
                  key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """:func:`refattn.routing.attention_vjp` on the device."""
    call, (q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask) = intake(
        check_attention_vjp, q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask)
    return call.out(*attention_vjp_core(call, q, k, v, centroids, dout, window=window, causal=causal,
                                        shared_qk=shared_qk, profile=profile, key_padding_mask=key_padding_mask))
