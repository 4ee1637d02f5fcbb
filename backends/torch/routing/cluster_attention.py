"""Routing step 4 on tensors (reference: :mod:`refattn.routing.cluster_attention`).

Differs from the reference: all clusters at once (no chunks), as one batched matmul for the
(B, H, C, Wq, Wk) logits; no mask is built when nothing is masked (no causal, no self logit, no
empty slot); masked logits are the dtype's lowest finite value rather than -inf
(:func:`masked_softmax`); the gradients are autograd's through the gather, matmul and scatter (the
logits are O(L^1.5) per (batch, head): recomputing them in a hand-written backward would save
little). The members' values are checked by :func:`refattn.checks.members_array` on a host copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refattn import checks
from refattn.routing.profiles import Profile, check_configuration, get_profile

from ..tensors import check_overflow, checked, compute_dtype, host_copy, same_dtype, tensors, vjp
from .indexing import all_slots_filled, gather
from .normalize import normalize_core

__all__ = [
    "cluster_attention",
    "cluster_attention_vjp",
    "check_cluster_attention",
    "check_cluster_attention_vjp",
    "cluster_attention_core",
    "routed_inputs",
    "check_members",
    "features",
    "attend",
    "masked_softmax",
]


@checked
def routed_inputs(q: Any, k: Any, v: Any, causal: Any, shared_qk: Any, profile: Any) -> tuple[Any, ...]:
    """The checks shared by the routed-attention entry points (as the reference's ``routed_inputs``):
    returns (q, k, v, causal, shared_qk, profile), the tensors unchanged, the profile a ``Profile``."""
    profile = get_profile(profile)
    causal, shared_qk = checks.flag(causal, "causal"), checks.flag(shared_qk, "shared_qk")
    checks.shared_keys(k, shared_qk)
    check_configuration(profile, causal, shared_qk)
    q, k, v = tensors(q=q, k=k, v=v)
    checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if k is not None:
        checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    same_dtype(q=q, k=k, v=v)
    return q, k, v, causal, shared_qk, profile


def check_members(members: torch.Tensor, name: str, batch: int, heads: int, length: int) -> torch.Tensor:
    """:func:`refattn.checks.members_array` of an integer tensor: int64, its values checked on a host
    copy (only the dtype, rank and shape while ``torch.compile`` traces)."""
    members = checks.index_array(members, name, rank=4, axes="(B, H, C, W)")
    if checks.values_readable(members):
        checks.members_array(host_copy(members), name, batch, heads, length)
    else:
        checks.expect_shape(members, name, (batch, heads, None, None), "(B, H, C, W)")
    return members


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``valid``; rows without a valid entry are all 0.

    Invalid logits are set to the dtype's lowest finite value instead of -inf, so the fused softmax
    never sees a row of -inf (NaN): in a row with a valid entry, exp(lowest - max) is exactly 0, the
    weight a -inf logit gets; a row without one comes out uniform and is multiplied by 0.
    """
    lowest = torch.finfo(logits.dtype).min
    weights = torch.softmax(logits.masked_fill(~valid, lowest), dim=-1)
    return weights * valid.any(dim=-1, keepdim=True).to(weights.dtype)


def features(q: torch.Tensor, k: torch.Tensor | None, profile: Profile,
             shared_qk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_q, f_k), the (B, H, L, D) vectors whose dot products are the profile's logits."""
    if profile.logits_use_normalized:
        f_q = normalize_core(q, profile)
        f_k = f_q if shared_qk else normalize_core(k, profile)
    else:
        f_q = q
        f_k = normalize_core(q, profile) if shared_qk else k
    return f_q, f_k


def attend(f_q, f_k, v, q_members, k_members, causal: bool, shared_qk: bool, profile: Profile) -> torch.Tensor:
    """o (B, H, C, Wq, Dv): the attention inside the clusters from the logit features f_q, f_k."""
    if profile.scaled_logits:  # scale the L x D queries, not the C x W x W logits
        f_q = f_q * (1.0 / math.sqrt(f_q.shape[-1]))
    fq, fk, vg = gather(f_q, q_members), gather(f_k, k_members), gather(v, k_members)
    logits = torch.matmul(fq, fk.transpose(-1, -2))  # (B, H, C, Wq, Wk)
    if not causal and not (shared_qk and profile.self_logit is not None) and all_slots_filled(q_members, k_members):
        return torch.matmul(torch.softmax(logits, dim=-1), vg)  # nothing to mask
    qpos, kpos = q_members.unsqueeze(-1), k_members.unsqueeze(-2)
    valid = (qpos >= 0) & (kpos >= 0)
    if causal:
        valid = valid & (kpos <= qpos)
    if shared_qk and profile.self_logit is not None:
        fixed = valid & (kpos == qpos)
        logits = logits.masked_fill(fixed, profile.self_logit)
    return torch.matmul(masked_softmax(logits, valid), vg)


def cluster_attention_core(q, k, v, q_members, k_members, causal: bool, shared_qk: bool,
                           profile: Profile) -> torch.Tensor:
    """o (B, H, C, Wq, Dv) of compute-dtype tensors (no checks); differentiable in q, k, v."""
    f_q, f_k = features(q, k, profile, shared_qk)
    return attend(f_q, f_k, v, q_members, k_members, causal, shared_qk, profile)


@checked
def check_cluster_attention(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, causal: Any = False,
                            shared_qk: Any = False, profile: Any = "tacl") -> tuple[Any, ...]:
    """Validate the arguments of :func:`cluster_attention`; returns them in that order (members as int64)."""
    tensors(q=q, k=k, v=v, q_members=q_members, k_members=k_members)
    q, k, v, causal, shared_qk, profile = routed_inputs(q, k, v, causal, shared_qk, profile)
    batch, heads, length, _ = q.shape
    q_members = check_members(q_members, "q_members", batch, heads, length)
    k_members = check_members(k_members, "k_members", batch, heads, length)
    if k_members.shape[2] != q_members.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {q_members.shape[2]} as q_members, "
            f"got shape {tuple(k_members.shape)}"
        )
    return q, k, v, q_members, k_members, causal, shared_qk, profile


def cluster_attention(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, *, causal: bool = False,
                      shared_qk: bool = False, profile: str = "tacl") -> torch.Tensor:
    """o (B, H, C, Wq, Dv) of q's dtype, differentiable in q, k, v (k None with shared QK)."""
    q, k, v, qm, km, causal, shared_qk, profile = check_cluster_attention(
        q, k, v, q_members, k_members, causal, shared_qk, profile)
    cd = compute_dtype(q.dtype)
    qc, kc = q.to(cd), None if k is None else k.to(cd)
    o = cluster_attention_core(qc, kc, v.to(cd), qm, km, causal, shared_qk, profile)
    check_overflow(o, "the cluster attention", q=qc, k=kc)
    return o.to(q.dtype)


@checked
def check_cluster_attention_vjp(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any,
                                causal: Any = False, shared_qk: Any = False, profile: Any = "tacl") -> tuple[Any, ...]:
    """Validate the arguments of :func:`cluster_attention_vjp`; returns them in that order."""
    q, do = tensors(q=q, do=do)
    q, k, v, qm, km, causal, shared_qk, profile = check_cluster_attention(
        q, k, v, q_members, k_members, causal, shared_qk, profile)
    checks.float_array(do, "do", rank=5, axes="(B, H, C, W, Dv)")
    checks.expect_shape(do, "do", tuple(qm.shape) + (v.shape[3],), "(B, H, C, W, Dv)")
    return q, k, v, qm, km, do, causal, shared_qk, profile


def cluster_attention_vjp(q: Any, k: Any, v: Any, q_members: Any, k_members: Any, do: Any, *, causal: bool = False,
                          shared_qk: bool = False, profile: str = "tacl") -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of the inputs' (B, H, L, ·) shapes and dtypes (membership fixed); dk None with shared QK."""
    q, k, v, qm, km, do, causal, shared_qk, profile = check_cluster_attention_vjp(
        q, k, v, q_members, k_members, do, causal, shared_qk, profile)
    cd = compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(cd), None if k is None else k.to(cd), v.to(cd), do.to(cd)
    if shared_qk:
        dq, dv = vjp(lambda a, c: cluster_attention_core(a, None, c, qm, km, causal, True, profile), [qc, vc], [doc])
        dk = None
    else:
        dq, dk, dv = vjp(lambda a, b, c: cluster_attention_core(a, b, c, qm, km, causal, False, profile),
                         [qc, kc, vc], [doc])
    where = "the gradient of the cluster attention"
    check_overflow((dq, dk), where, do=doc, v=vc, q=qc, k=kc)
    check_overflow(dv, where, do=doc)
    return dq.to(q.dtype), None if dk is None else dk.to(k.dtype), dv.to(v.dtype)
