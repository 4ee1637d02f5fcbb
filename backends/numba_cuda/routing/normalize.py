"""Routing step 1 on the device (:mod:`refattn.routing.normalize`, whose checks it runs).

How it differs from the reference: one device row per (b, h, t) of any rank's last axis: up to 32
lanes on consecutive features, about 8 features each, their sums tree-reduced (a row of D <= 8 is
one thread). The VJP can add another gradient in the same pass (``base``): the cluster attention's
backward sums two gradients of q so.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from refattn.routing.normalize import OVERFLOWS, check_normalize, check_normalize_vjp
from refattn.routing.profiles import Profile

from .. import device
from ..kernels import KernelTable, registry
from ..runtime import REDUCE, Call, intake, row_launch

__all__ = ["normalize", "normalize_vjp", "normalize_core", "normalize_vjp_core"]


def as_rows(x: Any) -> Any:
    """The C-contiguous device array ``x`` as a 4-D (B, H, L, D) array whose (b, h, t) are its rows."""
    shape = tuple(x.shape)
    if len(shape) == 4:
        return x
    return x.reshape(1, 1, math.prod(shape[:-1]), shape[-1])


def normalize_core(call: Call, x: Any, *, profile: Profile) -> Any:
    """N(x), the profile's normalization of the device array ``x`` (any rank) over its last axis."""
    out = call.empty(x.shape)
    rows = as_rows(x)
    call.launch("normalize_k", *row_launch(rows.shape[3], math.prod(tuple(rows.shape)[:3])), rows,
                int(profile.norm == "layernorm"), call.scalar(profile.norm_eps), as_rows(out))
    return out


def normalize(x: Any, *, profile: str = "tacl") -> Any:
    """:func:`refattn.routing.normalize` on the device."""
    call, (x, profile) = intake(check_normalize, x, profile)
    x_hat = normalize_core(call, x, profile=profile)
    call.watch_rules(x_hat, OVERFLOWS["normalize"], x=x)
    return call.out(x_hat)


def normalize_vjp_core(call: Call, x: Any, dx_hat: Any, *, profile: Profile, base: Any = None) -> Any:
    """dx = [base +] N'(x)ᵀ dx_hat of device arrays of one shape."""
    dx = call.empty(x.shape)
    rows, dy = as_rows(x), as_rows(dx_hat)
    call.launch("normalize_vjp_k", *row_launch(rows.shape[3], math.prod(tuple(rows.shape)[:3])), rows, dy,
                int(profile.norm == "layernorm"), call.scalar(profile.norm_eps), int(base is not None),
                dy if base is None else as_rows(base), as_rows(dx))
    return dx


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> Any:
    """:func:`refattn.routing.normalize_vjp` on the device."""
    call, (x, dx_hat, profile) = intake(check_normalize_vjp, x, dx_hat, profile)
    dx = normalize_vjp_core(call, x, dx_hat, profile=profile)
    call.watch_rules(dx, OVERFLOWS["normalize_vjp"], dx_hat=dx_hat)
    return call.out(dx)


def kernels(dt: Any) -> KernelTable:
    """The normalization kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    tree_sum = device.functions(dt).tree_sum
    table, kernel = registry()

    @cuda.jit(device=True, inline=True)
    def row_of(x):
        """(b, h, t, active) of this thread's row: blockDim.y rows per block, blockDim.x lanes per row."""
        batch, heads, length = x.shape[0], x.shape[1], x.shape[2]
        row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        return row // (length * heads), (row // length) % heads, row % length, row < batch * heads * length

    @cuda.jit(device=True, inline=True)
    def row_total(part, x, b, h, t, active):
        """sum_d x[b, h, t, d], to every lane of the row."""
        lane, width = cuda.threadIdx.x, cuda.blockDim.x
        acc = ZERO
        if active:
            for d in range(lane, x.shape[3], width):
                acc += x[b, h, t, d]
        return tree_sum(part, lane, width, 1, cuda.threadIdx.y * width, acc)

    @cuda.jit(device=True, inline=True)
    def row_dot(part, x, cx, y, cy, b, h, t, active):
        """sum_d (x[b, h, t, d] - cx) (y[b, h, t, d] - cy), to every lane of the row."""
        lane, width = cuda.threadIdx.x, cuda.blockDim.x
        acc = ZERO
        if active:
            for d in range(lane, x.shape[3], width):
                acc += (x[b, h, t, d] - cx) * (y[b, h, t, d] - cy)
        return tree_sum(part, lane, width, 1, cuda.threadIdx.y * width, acc)

    @cuda.jit(device=True, inline=True)
    def moments(part, x, b, h, t, active, layernorm, eps):
        """(center, scale) of the row: LayerNorm (mean, sqrt(variance + eps)), or L2 (0, ||x||, unclamped)."""
        if layernorm:
            mean = row_total(part, x, b, h, t, active) / dt(x.shape[3])
            return mean, math.sqrt(row_dot(part, x, mean, x, mean, b, h, t, active) / dt(x.shape[3]) + eps)
        return ZERO, math.sqrt(row_dot(part, x, ZERO, x, ZERO, b, h, t, active))

    @kernel("F4 i f F4", shared=REDUCE * (dt.bitwidth // 8))
    def normalize_k(x, layernorm, eps, out):
        """out = (x - m) / sqrt(v + eps) (``layernorm``) or x / max(||x||, eps), over the last axis."""
        part = cuda.shared.array(REDUCE, dt)
        b, h, t, active = row_of(x)
        center, scale = moments(part, x, b, h, t, active, layernorm, eps)
        if not layernorm:
            scale = max(scale, eps)
        if active:
            for d in range(cuda.threadIdx.x, x.shape[3], cuda.blockDim.x):
                out[b, h, t, d] = (x[b, h, t, d] - center) / scale

    @kernel("F4 F4 i f i F4 F4", shared=REDUCE * (dt.bitwidth // 8))
    def normalize_vjp_k(x, dy, layernorm, eps, has_base, base, dx):
        """dx = [base +] N'(x)ᵀ dy, N the normalization of :func:`normalize_k`; same layout.

        LayerNorm: (dy - mean(dy) - y mean(dy y)) / sigma, y = (x - m) / sigma. L2: (dy - y (y . dy)) / ||x||,
        y = x / ||x||; dy / eps where the clamp is active.
        """
        part = cuda.shared.array(REDUCE, dt)
        b, h, t, active = row_of(x)
        center, scale = moments(part, x, b, h, t, active, layernorm, eps)
        clamped = not layernorm and scale <= eps
        if clamped:
            scale = ONE
        if layernorm:
            mean_dy = row_total(part, dy, b, h, t, active) / dt(x.shape[3])
            dot = row_dot(part, x, center, dy, ZERO, b, h, t, active) / scale / dt(x.shape[3])
        else:
            mean_dy = ZERO
            dot = row_dot(part, x, ZERO, dy, ZERO, b, h, t, active) / scale
        if active:
            for d in range(cuda.threadIdx.x, x.shape[3], cuda.blockDim.x):
                y = (x[b, h, t, d] - center) / scale
                g = dy[b, h, t, d] / eps if clamped else (dy[b, h, t, d] - mean_dy - y * dot) / scale
                dx[b, h, t, d] = g + base[b, h, t, d] if has_base else g

    return table
