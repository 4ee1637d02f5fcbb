"""Routing step 2: similarity of every normalized token to every centroid (spec/routing.md, step 2).

    S[b, h, t, c] = x̂[b, h, t] · μ[h, c]

The centroids μ (H, C, D) are shared by queries and keys. This is a dot product, not a distance:
a larger S means closer (both implementations rank by the dot product, U:3095, R:256-262).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array, sequence

from ._checks import centroid_array

__all__ = ["similarity", "similarity_vjp"]


def similarity(x_hat: Any, centroids: Any) -> np.ndarray:
    """Dot products of the normalized tokens with the centroids of their head.

        S[b, h, t, c] = sum_d x_hat[b, h, t, d] * centroids[h, c, d]

    Args:
        x_hat: (B, H, L, D) normalized queries or keys.
        centroids: (H, C, D) centroid means.

    Returns:
        S, (B, H, L, C) float64. Cost O(B H L C D).
    """
    x_hat = sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    return np.einsum("bhld,hcd->bhlc", x_hat, centroids, optimize=True)


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`similarity`.

        dx_hat[b, h, t] = sum_c ds[b, h, t, c] μ[h, c],     dμ[h, c] = sum_{b, t} ds[b, h, t, c] x_hat[b, h, t]

    Args:
        x_hat, centroids: the forward inputs; ds: cotangent of S, (B, H, L, C).

    Returns:
        (dx_hat (B, H, L, D), dcentroids (H, C, D)), float64.
    """
    x_hat = sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    ds = float_array(ds, "ds", rank=4, axes="(B, H, L, C)")
    expect_shape(ds, "ds", x_hat.shape[:3] + (centroids.shape[1],), "(B, H, L, C)")
    dx_hat = np.einsum("bhlc,hcd->bhld", ds, centroids, optimize=True)
    dcentroids = np.einsum("bhlc,bhld->hcd", ds, x_hat, optimize=True)
    return dx_hat, dcentroids
