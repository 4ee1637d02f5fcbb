"""Routing attention end to end on tensors (reference: :mod:`refattn.routing.attention`).

Differs from the reference: ``attention`` is differentiable with ``torch.autograd`` and works under
``torch.compile``; the routing runs on detached tensors (membership is discrete: no gradient reaches
the similarities or the centroids); the normalized q̂ (and k̂) are formed once, for the routing and,
where the profile uses them, for the logits; the similarities are formed as (B, H, C, L), the
layout the per-centroid top-W reads; with nothing to mask, the cluster attention and the
combination are one autograd function (:func:`~.cluster_attention.unmasked_attention`: no (B, H, C, W, Dv)
o is formed). ``attention_vjp`` is autograd's VJP of the same pipeline.
``default_num_clusters`` and ``default_window`` are the reference's.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.routing.attention import OVERFLOWS, default_num_clusters, default_window
from refattn.routing.cluster_attention import OVERFLOWS as CLUSTER_OVERFLOWS
from refattn.routing.profiles import Profile

from ..tensors import check_overflow, check_overflows, checked, compute_dtype, tensors, vjp
from .cluster_attention import attend, logit_scale, routed_inputs, unmasked, unmasked_attention
from .combine import combine_core
from .indexing import member_counts
from .normalize import normalize_core
from .route import route_by_centroid

__all__ = [
    "attention",
    "attention_vjp",
    "check_attention",
    "check_attention_vjp",
    "attention_core",
    "default_num_clusters",
    "default_window",
]


@checked
def check_attention(q: Any, k: Any, v: Any, centroids: Any, window: Any = None, causal: Any = False,
                    shared_qk: Any = False, profile: Any = "tacl", key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`attention`; returns them in that order (``window`` resolved)."""
    tensors(q=q, k=k, v=v, centroids=centroids, key_padding_mask=key_padding_mask)
    q, k, v, causal, shared_qk, profile = routed_inputs(q, k, v, causal, shared_qk, profile)
    batch, heads, length, dim = q.shape
    checks.centroid_array(centroids, heads, dim)
    if window is None:
        window = default_window(length, centroids.shape[1])
    window = checks.integer_in_range(window, "window", low=1, high=length)
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return q, k, v, centroids, window, causal, shared_qk, profile, mask


CHUNK_SCORES = 1 << 22  # similarities (B * heads * C * L entries) per chunk of heads in the routing


def routed(x: torch.Tensor, centroids: torch.Tensor, window: int, mask: torch.Tensor | None, name: str,
           profile: Profile | None = None) -> torch.Tensor:
    """Members (B, H, C, W) of tokens (detached), normalized here by ``profile`` (None: already normalized);
    ``ValueError`` if a similarity overflows. On a CPU in chunks of heads: the similarities and normalized
    tokens stay small enough for the allocator to reuse (a fresh block of 32 MiB or more costs a page
    fault per 4 KiB)."""
    batch, heads, length, _ = x.shape
    per = max(1, CHUNK_SCORES // (batch * centroids.shape[1] * length)) if x.device.type == "cpu" else heads
    parts = []
    with torch.no_grad():
        for first in range(0, heads, per):
            x_hat = x.detach()[:, first : first + per]
            if profile is not None:
                x_hat = normalize_core(x_hat, profile)
            scores = torch.matmul(centroids.detach()[first : first + per].unsqueeze(0), x_hat.transpose(-1, -2))
            check_overflow(scores, f"the similarity of the normalized {name} to the centroids", centroids=centroids)
            parts.append(route_by_centroid(scores, window, mask))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def attention_core(q, k, v, centroids, window: int, causal: bool, shared_qk: bool, profile: Profile,
                   mask: torch.Tensor | None, *, check_outputs: bool = True) -> torch.Tensor:
    """The pipeline on compute-dtype tensors (no argument checks); differentiable in q, k, v; ``ValueError``
    when a similarity overflows and, with ``check_outputs`` (the forward's), the cluster attention or the
    combination. The gradient checks its results instead, as the reference's does (:func:`attention_vjp`)."""

    def check_cluster_outputs(o: torch.Tensor) -> None:
        if check_outputs:
            check_overflows(o, CLUSTER_OVERFLOWS["cluster_attention"], q=q, k=k)

    if profile.logits_use_normalized:  # the normalized tokens are the logits' features
        f_q = normalize_core(q, profile)
        f_k = f_q if shared_qk else normalize_core(k, profile)
        q_members = routed(f_q, centroids, window, mask, "q")
        k_members = q_members if shared_qk else routed(f_k, centroids, window, mask, "k")
    elif shared_qk:  # the raw queries and the normalized ones as keys
        f_q, f_k = q, normalize_core(q, profile)
        q_members = k_members = routed(f_k, centroids, window, mask, "q")
    else:  # the raw tokens: the routing normalizes its own, chunk by chunk
        f_q, f_k = q, k
        q_members = routed(q, centroids, window, mask, "q", profile)
        k_members = routed(k, centroids, window, mask, "k", profile)
    if unmasked(q_members, k_members, causal, shared_qk, profile):  # attention and combination in one
        divisor = (member_counts(q_members, q.shape[2], q.dtype) + profile.combine_eps).unsqueeze(-1)
        out = unmasked_attention(f_q, f_k, v, q_members, k_members, logit_scale(profile, q.shape[-1]), divisor,
                                 check_cluster_outputs)
    else:
        o = attend(f_q, f_k, v, q_members, k_members, causal, shared_qk, profile)
        check_cluster_outputs(o)
        out = combine_core(o, q_members, q.shape[2], profile)
    if check_outputs:
        check_overflows(out, OVERFLOWS["attention"], v=v)
    return out


def attention(q: Any, k: Any, v: Any, centroids: Any, *, window: int | None = None, causal: bool = False,
              shared_qk: bool = False, profile: str = "tacl", key_padding_mask: Any = None) -> torch.Tensor:
    """out (B, H, L, Dv) of q's dtype, differentiable in q, k, v (k None with shared QK); centroids of
    any float dtype, cast to q's compute dtype."""
    q, k, v, centroids, window, causal, shared_qk, profile, mask = check_attention(
        q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    cd = compute_dtype(q.dtype)
    out = attention_core(q.to(cd), None if k is None else k.to(cd), v.to(cd), centroids.to(cd), window, causal,
                         shared_qk, profile, mask)
    return out.to(q.dtype)


@checked
def check_attention_vjp(q: Any, k: Any, v: Any, centroids: Any, dout: Any, window: Any = None, causal: Any = False,
                        shared_qk: Any = False, profile: Any = "tacl", key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`attention_vjp`; returns them in that order."""
    q, dout = tensors(q=q, dout=dout)
    q, k, v, centroids, window, causal, shared_qk, profile, mask = check_attention(
        q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    checks.float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    checks.expect_shape(dout, "dout", tuple(v.shape), "(B, H, L, Dv)")
    return q, k, v, centroids, dout, window, causal, shared_qk, profile, mask


def attention_vjp(q: Any, k: Any, v: Any, centroids: Any, dout: Any, *, window: int | None = None,
                  causal: bool = False, shared_qk: bool = False, profile: str = "tacl",
                  key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of the inputs' dtypes with the membership fixed; dk None with shared QK."""
    q, k, v, centroids, dout, window, causal, shared_qk, profile, mask = check_attention_vjp(
        q, k, v, centroids, dout, window, causal, shared_qk, profile, key_padding_mask)
    cd = compute_dtype(q.dtype)
    means = centroids.to(cd)
    qc, kc, vc, doutc = q.to(cd), None if k is None else k.to(cd), v.to(cd), dout.to(cd)
    if shared_qk:
        dq, dv = vjp(lambda a, c: attention_core(a, None, c, means, window, causal, True, profile, mask,
                                                 check_outputs=False), [qc, vc], [doutc])
        dk = None
    else:
        dq, dk, dv = vjp(lambda a, b, c: attention_core(a, b, c, means, window, causal, False, profile, mask,
                                                        check_outputs=False), [qc, kc, vc], [doutc])
    check_overflows((dq, dk, dv), OVERFLOWS["attention_vjp"], q=qc, k=kc, v=vc, dout=doutc)
    return dq.to(q.dtype), None if dk is None else dk.to(k.dtype), dv.to(v.dtype)
