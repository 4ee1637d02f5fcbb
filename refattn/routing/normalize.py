"""Routing step 1: normalize queries and keys over the head dimension (spec/routing.md, step 1).

- ``tacl``: LayerNorm without scale or bias, x̂ = (x - mean(x)) / sqrt(var(x) + 1e-6), the
  variance being the biased one (divided by D). x̂ has mean 0 and norm about sqrt(D).
- ``lucidrains``: unit L2 norm, x̂ = x / max(||x||, 1e-12).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array

from .profiles import Profile, get_profile

__all__ = ["normalize", "normalize_vjp"]


def _normalize(x: np.ndarray, profile: Profile) -> np.ndarray:
    """The profile's normalization over the last axis of a float64 array of any rank (no checks)."""
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        variance = np.mean(centered * centered, axis=-1, keepdims=True)
        return centered / np.sqrt(variance + profile.norm_eps)
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, profile.norm_eps)


def _normalize_vjp(x: np.ndarray, dy: np.ndarray, profile: Profile) -> np.ndarray:
    """The VJP of :func:`_normalize` over the last axis (no checks)."""
    if profile.norm == "layernorm":
        centered = x - x.mean(axis=-1, keepdims=True)
        sigma = np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + profile.norm_eps)
        y = centered / sigma
        return (dy - dy.mean(axis=-1, keepdims=True) - y * np.mean(dy * y, axis=-1, keepdims=True)) / sigma
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    clamped = norm <= profile.norm_eps
    safe = np.where(clamped, 1.0, norm)
    y = x / safe
    unit = (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / safe
    return np.where(clamped, dy / profile.norm_eps, unit)


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
    spec = get_profile(profile)
    x = float_array(x, "x")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected an array whose last axis (D) has at least 1 entry, got shape {x.shape}")
    return _normalize(x, spec)


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
    spec = get_profile(profile)
    x = float_array(x, "x")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected an array whose last axis (D) has at least 1 entry, got shape {x.shape}")
    dy = float_array(dx_hat, "dx_hat")
    expect_shape(dy, "dx_hat", x.shape, "like x")
    return _normalize_vjp(x, dy, spec)
