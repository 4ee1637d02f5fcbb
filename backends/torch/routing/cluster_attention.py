"""Routing step 4 on tensors (reference: :mod:`refattn.routing.cluster_attention`).

Differs from the reference: all clusters at once, as one batched matmul for the (B, H, C, Wq, Wk)
logits (on a CPU, in chunks of clusters when nothing is masked); when nothing is masked
(no causal, no self logit, no empty slot) one autograd function (:class:`UnmaskedAttention`, also
the combination for ``attention``) gathers, attends and, in its hand-written backward, reuses the
saved probabilities and scatters the three gradients, with no mask, no copy of the scaled queries
and the softmax and its gradient in place; otherwise masked logits are the dtype's lowest finite
value rather than -inf (:func:`masked_softmax`) and the gradients are autograd's through the
gather, matmul and scatter. The members' values are checked by :func:`refattn.checks.members_array`
on a host copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refattn import checks
from refattn.routing.cluster_attention import OVERFLOWS
from refattn.routing.profiles import Profile, check_configuration, get_profile

from ..tensors import check_overflows, checked, compute_dtype, host_copy, same_dtype, tensors, vjp
from .indexing import add_rows_into, all_slots_filled, flat_rows, gather
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
    "UnmaskedAttention",
    "unmasked_attention",
    "unmasked",
    "logit_scale",
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


CHUNK_WEIGHTS = 1 << 19  # attention weights (clusters * Wq * Wk entries) per chunk of clusters: 2 MiB in float32


class UnmaskedAttention(torch.autograd.Function):
    """o = softmax((scale · q_g) k_gᵀ) v_g per cluster, q_g = f_q[q_rows], k_g = f_k[k_rows], v_g = v[k_rows]
    (rows of the flattened (B * H * L, ·) inputs, every slot filled), returned as (B * H * C, Wq, Dv); or,
    given ``divisor`` (B * H * L, 1), combined: out = Σ o rows into their tokens / divisor, (B * H * L, Dv).

    Backward, with P the saved probabilities and dO the cotangent of o (that of out gathered and divided)::

        dv_g = Pᵀ dO,   dS = P ∘ (dO v_gᵀ - rowsum(P ∘ dO v_gᵀ)),   dq_g = dS k_g,   dk_g = dSᵀ (scale · q_g)

    then dq = scale · Σ dq_g, dk = Σ dk_g, dv = Σ dv_g summed into the token rows: autograd's operations
    through the gathers, matmuls, softmax and combination. On a CPU, computed in chunks of clusters of at
    most :data:`CHUNK_WEIGHTS` weights, whose temporaries stay in the caches and in blocks the allocator
    reuses (a fresh block of 32 MiB or more costs a page fault per 4 KiB touched); the chunks add their
    rows in slot order, so each token's terms are summed in the order of one pass; ``check(o)`` sees each chunk;
    the gathered rows and probabilities are kept for the backward only when ``keep`` (grad mode and an
    input that requires grad).
    """

    @staticmethod
    def forward(ctx, f_q, f_k, v, q_rows, k_rows, shape, scale, divisor, check, keep):  # type: ignore[override]
        pairs, clusters, window_q, window_k = shape
        total = pairs * clusters
        per = max(1, CHUNK_WEIGHTS // (window_q * window_k)) if f_q.device.type == "cpu" else total
        out = None if divisor is None else torch.zeros(f_q.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
        parts, saved = [], []
        for first in range(0, total, per):
            n = min(per, total - first)
            qr = q_rows[first * window_q : (first + n) * window_q]
            kr = k_rows[first * window_k : (first + n) * window_k]
            gq = f_q.index_select(0, qr).view(n, window_q, -1)
            if scale != 1.0:
                gq.mul_(scale)  # scaling the gathered rows: the same products as gathering scaled rows
            gk = f_k.index_select(0, kr).view(n, window_k, -1)
            gv = v.index_select(0, kr).view(n, window_k, -1)
            weights = torch.bmm(gq, gk.transpose(1, 2))
            torch.softmax(weights, dim=-1, out=weights)  # in place: each row is read before it is written
            o = torch.bmm(weights, gv)
            check(o)
            if out is None:
                parts.append(o)
            else:
                add_rows_into(out, qr, o.view(-1, o.shape[-1]))
            if keep:
                saved += [gq, gk, gv, weights]
        ctx.save_for_backward(q_rows, k_rows, divisor, *saved)
        ctx.shape, ctx.scale, ctx.per, ctx.total_rows = shape, scale, per, f_q.shape[0]
        if out is None:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.div_(divisor)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q_rows, k_rows, divisor, *saved = ctx.saved_tensors
        pairs, clusters, window_q, window_k = ctx.shape
        dq, dk, dv = (torch.zeros(ctx.total_rows, x.shape[-1], dtype=x.dtype, device=x.device) for x in saved[:3])
        for index, first in enumerate(range(0, pairs * clusters, ctx.per)):
            gq, gk, gv, weights = saved[4 * index : 4 * index + 4]
            n = gq.shape[0]
            qr = q_rows[first * window_q : (first + n) * window_q]
            kr = k_rows[first * window_k : (first + n) * window_k]
            if divisor is None:
                do = grad[first : first + n]
            else:  # the combination's backward: dout / divisor at the members' rows
                do = grad.index_select(0, qr).div_(divisor.index_select(0, qr)).view(n, window_q, -1)
            add_rows_into(dv, kr, torch.bmm(weights.transpose(1, 2), do).view(n * window_k, -1))
            ds = torch.bmm(do, gv.transpose(1, 2))
            # dS = P * (dP - rowsum(P * dP)) in place; the row sums as (1 x Wk)(Wk x 1) products, no temporary
            row_sums = torch.bmm(ds.view(-1, 1, window_k), weights.view(-1, window_k, 1)).view(n, window_q, 1)
            ds.sub_(row_sums).mul_(weights)
            add_rows_into(dq, qr, torch.bmm(ds, gk).view(n * window_q, -1))
            add_rows_into(dk, kr, torch.bmm(ds.transpose(1, 2), gq).view(n * window_k, -1))
        if ctx.scale != 1.0:
            dq.mul_(ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def unmasked_attention(f_q, f_k, v, q_members, k_members, scale: float, divisor: torch.Tensor | None,
                       check: Any) -> torch.Tensor:
    """:class:`UnmaskedAttention` of (B, H, L, ·) tensors and (B, H, C, W) members (every slot filled):
    o (B * H * C, Wq, Dv), or with ``divisor`` (B, H, L, 1) the combined out (B, H, L, Dv)."""
    batch, heads, length, dim = f_q.shape
    shape = (batch * heads, q_members.shape[2], q_members.shape[3], k_members.shape[3])
    flat_divisor = None if divisor is None else divisor.reshape(-1, 1)
    result = UnmaskedAttention.apply(f_q.reshape(-1, dim), f_k.reshape(-1, dim), v.reshape(-1, v.shape[-1]),
                                     flat_rows(q_members, length), flat_rows(k_members, length), shape, scale,
                                     flat_divisor, check,
                                     torch.is_grad_enabled() and any(x.requires_grad for x in (f_q, f_k, v)))
    return result if divisor is None else result.view(batch, heads, length, -1)


def unmasked(q_members: torch.Tensor, k_members: torch.Tensor, causal: bool, shared_qk: bool,
             profile: Profile) -> bool:
    """Nothing to mask: no causal order, no fixed self logit, no empty slot. False under ``torch.compile``
    and under autocast (whose casts of each operation the autograd path keeps)."""
    if torch.is_autocast_enabled(q_members.device.type):
        return False
    return not causal and not (shared_qk and profile.self_logit is not None) and all_slots_filled(q_members, k_members)


def logit_scale(profile: Profile, dim: int) -> float:
    """The factor of the queries in the logits: 1 / sqrt(D) for the scaled profiles, else 1."""
    return 1.0 / math.sqrt(dim) if profile.scaled_logits else 1.0


def attend(f_q, f_k, v, q_members, k_members, causal: bool, shared_qk: bool, profile: Profile) -> torch.Tensor:
    """o (B, H, C, Wq, Dv): the attention inside the clusters from the logit features f_q, f_k."""
    scale = logit_scale(profile, f_q.shape[-1])
    if unmasked(q_members, k_members, causal, shared_qk, profile):
        o = unmasked_attention(f_q, f_k, v, q_members, k_members, scale, None, lambda o: None)
        return o.view(q_members.shape + (v.shape[-1],))
    if scale != 1.0:  # scale the L x D queries, not the C x W x W logits
        f_q = f_q * scale
    fq, fk, vg = gather(f_q, q_members), gather(f_k, k_members), gather(v, k_members)
    logits = torch.matmul(fq, fk.transpose(-1, -2))  # (B, H, C, Wq, Wk)
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
    check_overflows(o, OVERFLOWS["cluster_attention"], q=qc, k=kc)
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
    check_overflows((dq, dk, dv), OVERFLOWS["cluster_attention_vjp"], q=qc, k=kc, v=vc, do=doc)
    return dq.to(q.dtype), None if dk is None else dk.to(k.dtype), dv.to(v.dtype)
