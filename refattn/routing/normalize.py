"""Routing step 1: normalize queries and keys over the head dimension (spec/routing.md, step 1).

- ``tacl``: LayerNorm without scale or bias, x̂ = (x - mean(x)) / sqrt(var(x) + 1e-6), the
  variance being the biased one (divided by D). x̂ has mean 0 and norm about sqrt(D).
- ``lucidrains``: unit L2 norm, x̂ = x / max(||x||, 1e-12).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .profiles import Profile, get_profile

__all__ = ["normalize", "normalize_vjp", "check_normalize", "check_normalize_vjp", "normalize_core",
           "normalize_vjp_core"]


def _any_rank(x: Any, name: str) -> Any:
    """A float array of any rank >= 1 whose last axis (D) is non-empty."""
    x = checks.float_array(checks.as_array(x, name), name)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected an array whose last axis (D) has at least 1 entry, got shape {x.shape}")
    return x


def check_normalize(x: Any, profile: Any = "tacl") -> tuple[Any, Profile]:
    """Validate the arguments of :func:`normalize`; returns them in that order (the profile as a
    :class:`~refattn.routing.profiles.Profile`)."""
    profile = get_profile(profile)
    return _any_rank(x, "x"), profile


def normalize_core(x: Any, *, profile: Profile) -> Any:
    """The profile's normalization over the last axis of a floating array of any rank, computed and
    returned in its dtype (no checks)."""
    xp = checks.array_namespace(x)
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        variance = xp.mean(centered * centered, axis=-1, keepdims=True)
        return centered / xp.sqrt(variance + profile.norm_eps)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    return x / xp.maximum(norm, profile.norm_eps)


# x̂ itself is bounded, its moments are not: with |x| near the dtype's largest value tacl's mean overflows (x̂ NaN).
OVERFLOWS = {
    "normalize": (checks.Overflow("the normalization", ("x",)),),
    "normalize_vjp": (checks.Overflow("the gradient of the normalization", ("dx_hat",)),),
}


def normalize(x: Any, *, profile: str = "tacl") -> np.ndarray:
    """Normalize every row of ``x`` over its last axis, as the profile's routing does.

    ``tacl``::

        x̂ = (x - m) / sqrt(v + 1e-6),   m = mean_d x_d,   v = mean_d (x_d - m)^2

    (LayerNorm with no scale and no bias: mean 0, ||x̂|| ~ sqrt(D). With D = 1, x̂ = 0.)

    ``lucidrains``::

        x̂ = x / max(||x||_2, 1e-12)

    (unit norm; a zero row stays zero).

    Args:
        x: float array (B, H, L, D) (any rank >= 1 is accepted: the centroids are normalized the
            same way); promoted to float64.
        profile: ``"tacl"`` or ``"lucidrains"``.

    Returns:
        x̂, float64, same shape as x.
    """
    x, profile = check_normalize(x, profile)
    x = as_float64(x)
    x_hat = normalize_core(x, profile=profile)
    checks.check_overflows(x_hat, OVERFLOWS["normalize"], x=x)
    return x_hat


def check_normalize_vjp(x: Any, dx_hat: Any, profile: Any = "tacl") -> tuple[Any, Any, Profile]:
    """Validate the arguments of :func:`normalize_vjp`; returns them in that order."""
    profile = get_profile(profile)
    x = _any_rank(x, "x")
    dx_hat = checks.float_array(checks.as_array(dx_hat, "dx_hat"), "dx_hat")
    checks.expect_shape(dx_hat, "dx_hat", x.shape, "like x")
    return x, dx_hat, profile


def normalize_vjp_core(x: Any, dx_hat: Any, *, profile: Profile) -> Any:
    """The VJP of :func:`normalize_core` over the last axis (no checks), in the inputs' dtype."""
    xp = checks.array_namespace(x, dx_hat)
    dy = dx_hat
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        sigma = xp.sqrt(xp.mean(centered * centered, axis=-1, keepdims=True) + profile.norm_eps)
        y = centered / sigma
        return (dy - dy.mean(axis=-1, keepdims=True) - y * xp.mean(dy * y, axis=-1, keepdims=True)) / sigma
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    clamped = norm <= profile.norm_eps
    safe = xp.where(clamped, 1.0, norm)
    y = x / safe
    unit = (dy - y * xp.sum(y * dy, axis=-1, keepdims=True)) / safe
    return xp.where(clamped, dy / profile.norm_eps, unit)


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> np.ndarray:
    """Vector-Jacobian product of :func:`normalize`.

    ``tacl``, with y = x̂ and σ = sqrt(v + 1e-6)::

        dx = (dy - mean_d(dy) - y * mean_d(dy * y)) / σ

    ``lucidrains``, with n = ||x||::

        dx = (dy - y (y · dy)) / n     if n > 1e-12,    dx = dy / 1e-12 otherwise (the clamp is active)

    Args:
        x: the forward input; dx_hat: cotangent of x̂, same shape.

    Returns:
        dx, float64, same shape as x.
    """
    x, dx_hat, profile = check_normalize_vjp(x, dx_hat, profile)
    x, dx_hat = as_float64(x, dx_hat)
    dx = normalize_vjp_core(x, dx_hat, profile=profile)
    checks.check_overflows(dx, OVERFLOWS["normalize_vjp"], dx_hat=dx_hat)
    return dx
