"""Routing step 5 on the device (:mod:`refattn.routing.combine`, whose checks it runs).

How it differs from the reference: the member counts and the scatter of o / (count + ε) to positions
are atomic adds, one thread per element (the feature fastest: coalesced); their order varies from
run to run, so the last bits may too (within the tolerances). ``combine_vjp`` is a gather.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from refattn.routing.combine import OVERFLOWS, check_combine, check_combine_vjp
from refattn.routing.profiles import Profile

from ..device import unravel4
from ..kernels import KernelTable, registry
from ..runtime import Call, intake

__all__ = ["combine", "combine_vjp", "combine_core", "combine_vjp_core"]


def member_counts(call: Call, members: Any, length: int) -> Any:
    """count[b, h, t] = number of slots holding t, (B, H, L) int64 on the device."""
    counts = call.zeros((members.shape[0], members.shape[1], length), np.int64)
    call.flat("combine_count_k", members.size, members, counts)
    return counts


def combine_core(call: Call, o: Any, q_members: Any, length: int, *, profile: Profile) -> Any:
    """out (B, H, L, Dv) of device o and members."""
    out = call.zeros((o.shape[0], o.shape[1], length, o.shape[4]))
    call.flat("combine_k", o.size, o, q_members, member_counts(call, q_members, length),
              call.scalar(profile.combine_eps), out)
    return out


def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> Any:
    """:func:`refattn.routing.combine` on the device."""
    call, (o, q_members, length, profile) = intake(check_combine, o, q_members, length, profile)
    out = combine_core(call, o, q_members, length, profile=profile)
    call.watch_rules(out, OVERFLOWS["combine"], o=o)
    return call.out(out)


def combine_vjp_core(call: Call, q_members: Any, dout: Any, *, profile: Profile) -> Any:
    """do (B, H, C, W, Dv) of device members and dout."""
    do = call.empty(tuple(q_members.shape) + (dout.shape[3],))
    call.flat("combine_vjp_k", do.size, dout, q_members, member_counts(call, q_members, dout.shape[2]),
              call.scalar(profile.combine_eps), do)
    return do


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> Any:
    """:func:`refattn.routing.combine_vjp` on the device."""
    call, (q_members, dout, profile) = intake(check_combine_vjp, q_members, dout, profile)
    return call.out(combine_vjp_core(call, q_members, dout, profile=profile))


def kernels(dt: Any) -> KernelTable:
    """The combine kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def slot_of(idx, x):
        """(b, h, c, w, e) of the flat index into x (B, H, C, W, Dv), e fastest."""
        b, h, c, w = unravel4(idx // x.shape[4], x.shape[1], x.shape[2], x.shape[3])
        return b, h, c, w, idx % x.shape[4]

    @kernel("I4 I3")
    def combine_count_k(members, counts):
        """counts[b, h, t] += 1 for every filled slot holding t (atomic); one thread per slot."""
        idx = cuda.grid(1)
        if idx >= members.size:
            return
        b, h, c, w = unravel4(idx, members.shape[1], members.shape[2], members.shape[3])
        t = members[b, h, c, w]
        if t >= 0:
            cuda.atomic.add(counts, (b, h, t), 1)

    @kernel("F5 I4 I3 f F4")
    def combine_k(o, members, counts, eps, out):
        """out[b, h, t, e] += o[b, h, c, w, e] / (counts[b, h, t] + eps) with t = members[b, h, c, w] (atomic).

        One thread per element of o, the feature fastest (coalesced reads and atomics); empty slots skipped.
        """
        idx = cuda.grid(1)
        if idx >= o.size:
            return
        b, h, c, w, e = slot_of(idx, o)
        t = members[b, h, c, w]
        if t >= 0:
            cuda.atomic.add(out, (b, h, t, e), o[b, h, c, w, e] / (dt(counts[b, h, t]) + eps))

    @kernel("F4 I4 I3 f F5")
    def combine_vjp_k(dout, members, counts, eps, do):
        """do[b, h, c, w, e] = dout[b, h, t, e] / (counts[b, h, t] + eps), t = members[b, h, c, w]; 0 at empty slots.

        A gather: one thread per element of do, the feature fastest.
        """
        idx = cuda.grid(1)
        if idx >= do.size:
            return
        b, h, c, w, e = slot_of(idx, do)
        t = members[b, h, c, w]
        do[b, h, c, w, e] = dout[b, h, t, e] / (dt(counts[b, h, t]) + eps) if t >= 0 else ZERO
    return table
