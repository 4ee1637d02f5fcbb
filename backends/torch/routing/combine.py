"""Routing step 5 on tensors (reference: :mod:`refattn.routing.combine`).

Differs from the reference: the scatter is :func:`~refattn.backends.torch.routing.indexing.scatter_add`
(rows added in order, deterministically), differentiable with autograd.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.routing.combine import OVERFLOWS
from refattn.routing.profiles import Profile, get_profile

from ..tensors import check_overflows, checked, compute_dtype, tensors
from .cluster_attention import check_members
from .indexing import gather, member_counts, scatter_add

__all__ = ["combine", "combine_vjp", "check_combine", "check_combine_vjp", "combine_core"]


def combine_core(o: torch.Tensor, q_members: torch.Tensor, length: int, profile: Profile) -> torch.Tensor:
    """out (B, H, L, Dv) of a compute-dtype o (no checks); differentiable in o."""
    total = scatter_add(o, q_members, length)
    return total / (member_counts(q_members, length, o.dtype) + profile.combine_eps).unsqueeze(-1)


@checked
def check_combine(o: Any, q_members: Any, length: Any, profile: Any = "tacl") -> tuple[Any, ...]:
    """Validate the arguments of :func:`combine`; returns them in that order (members as int64)."""
    profile = get_profile(profile)
    o, q_members = tensors(o=o, q_members=q_members)
    length = checks.integer_in_range(length, "length", low=1)
    checks.float_array(o, "o", rank=5, axes="(B, H, C, W, Dv)")
    q_members = check_members(q_members, "q_members", o.shape[0], o.shape[1], length)
    if tuple(q_members.shape) != tuple(o.shape[:4]):
        raise ValueError(
            f"q_members: expected shape (B, H, C, W) = {tuple(o.shape[:4])} (that of o), got {tuple(q_members.shape)}")
    return o, q_members, length, profile


def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> torch.Tensor:
    """out (B, H, L, Dv) of o's dtype, differentiable in o."""
    o, q_members, length, profile = check_combine(o, q_members, length, profile)
    oc = o.to(compute_dtype(o.dtype))
    out = combine_core(oc, q_members, length, profile)
    check_overflows(out, OVERFLOWS["combine"], o=oc)
    return out.to(o.dtype)


@checked
def check_combine_vjp(q_members: Any, dout: Any, profile: Any = "tacl") -> tuple[Any, ...]:
    """Validate the arguments of :func:`combine_vjp`; returns them in that order."""
    profile = get_profile(profile)
    q_members, dout = tensors(q_members=q_members, dout=dout)
    checks.float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    batch, heads, length, _ = dout.shape
    return check_members(q_members, "q_members", batch, heads, length), dout, profile


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> torch.Tensor:
    """do (B, H, C, W, Dv) of dout's dtype, 0 at empty slots."""
    members, dout, profile = check_combine_vjp(q_members, dout, profile)
    cd = compute_dtype(dout.dtype)
    length = dout.shape[2]
    scaled = dout.to(cd) / (member_counts(members, length, cd) + profile.combine_eps).unsqueeze(-1)
    do = gather(scaled, members)
    do = torch.where((members >= 0).unsqueeze(-1), do, torch.zeros((), dtype=cd, device=do.device))
    return do.to(dout.dtype)
