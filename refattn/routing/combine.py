"""Routing step 5: put the cluster outputs back in sequence order (spec/routing.md, step 5).

A token can be a query member of several clusters or of none. Its output is the sum of its
cluster outputs divided by (its count + ε):

    out_t = sum_{(c, w): q_members[c, w] = t} o_{c,w} / (count_t + ε),   ε = 1e-2 (tacl) or 1e-5 (lucidrains)

A token in no cluster (count_t = 0) outputs 0; a token in exactly one outputs o / (1 + ε), not o
(U:2668, R:85-88).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .indexing import flat_rows, member_counts, scatter_add
from .profiles import Profile, get_profile

__all__ = ["combine", "combine_vjp", "check_combine", "check_combine_vjp", "combine_core", "combine_vjp_core"]


def check_combine(o: Any, q_members: Any, length: Any, profile: Any = "tacl") -> tuple[Any, Any, int, Profile]:
    """Validate the arguments of :func:`combine`; returns them in that order (members as int64)."""
    profile = get_profile(profile)
    length = checks.integer_in_range(length, "length", low=1)
    o, q_members = checks.arrays(o=o, q_members=q_members)
    o = checks.float_array(o, "o", rank=5, axes="(B, H, C, W, Dv)")
    q_members = checks.members_array(q_members, "q_members", o.shape[0], o.shape[1], length)
    if q_members.shape != o.shape[:4]:
        raise ValueError(f"q_members: expected shape (B, H, C, W) = {o.shape[:4]} (that of o), got {q_members.shape}")
    return o, q_members, length, profile


def combine_core(o: Any, q_members: Any, length: int, *, profile: Profile) -> Any:
    """:func:`combine` of validated arguments, computed and returned in the dtype of ``o``."""
    total = scatter_add(o, q_members, length)
    return total / (member_counts(q_members, length, o.dtype) + profile.combine_eps)[..., None]


OVERFLOWS = {"combine": (checks.Overflow("the combination of the cluster outputs", ("o",)),)}


def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> np.ndarray:
    """Scatter the cluster outputs back to their positions, averaging over clusters.

        out[b, h, t] = sum over the slots (c, w) with q_members[b, h, c, w] = t of o[b, h, c, w]
                       / (count[b, h, t] + ε)

    with count[b, h, t] the number of such slots and ε the profile's (1e-2 tacl, 1e-5 lucidrains).
    Empty slots (-1) are ignored, whatever o holds there.

    Args:
        o: (B, H, C, W, Dv) cluster outputs (from :func:`cluster_attention`).
        q_members: (B, H, C, W) int positions in [0, length), -1 = empty.
        length: L, the sequence length (>= 1).
        profile: ``"tacl"`` or ``"lucidrains"``.

    Returns:
        out (B, H, L, Dv) float64; rows of tokens in no cluster (and of padding) are 0.
    """
    o, q_members, length, profile = check_combine(o, q_members, length, profile)
    o = as_float64(o)
    out = combine_core(o, q_members, length, profile=profile)
    checks.check_overflows(out, OVERFLOWS["combine"], o=o)
    return out


def check_combine_vjp(q_members: Any, dout: Any, profile: Any = "tacl") -> tuple[Any, Any, Profile]:
    """Validate the arguments of :func:`combine_vjp`; returns them in that order."""
    profile = get_profile(profile)
    q_members, dout = checks.arrays(q_members=q_members, dout=dout)
    dout = checks.float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    batch, heads, length, _ = dout.shape
    q_members = checks.members_array(q_members, "q_members", batch, heads, length)
    return q_members, dout, profile


def combine_vjp_core(q_members: Any, dout: Any, *, profile: Profile) -> Any:
    """:func:`combine_vjp` of validated arguments, computed and returned in the dtype of ``dout``."""
    batch, heads, length, features = dout.shape
    scaled = dout / (member_counts(q_members, length, dout.dtype) + profile.combine_eps)[..., None]
    do = scaled.reshape(batch * heads * length, features)[flat_rows(q_members, length)]
    do[q_members < 0] = 0.0
    return do


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> np.ndarray:
    """Vector-Jacobian product of :func:`combine` (it is linear in o):

        do[b, h, c, w] = dout[b, h, t] / (count[b, h, t] + ε)   with t = q_members[b, h, c, w],
        do = 0 at empty slots.

    Args:
        q_members: (B, H, C, W) the forward's members; dout: (B, H, L, Dv) cotangent of out.

    Returns:
        do (B, H, C, W, Dv) float64.
    """
    q_members, dout, profile = check_combine_vjp(q_members, dout, profile)
    return combine_vjp_core(q_members, as_float64(dout), profile=profile)
