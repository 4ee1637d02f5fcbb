"""Routing step 2: similarity of every normalized token to every centroid (spec/routing.md, step 2).

    S[b, h, t, c] = x̂[b, h, t] · μ[h, c]

The centroids μ (H, C, D) are shared by queries and keys. This is a dot product, not a distance:
a larger S means closer (both implementations rank by the dot product, U:3095, R:256-262).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

__all__ = ["similarity", "similarity_vjp", "check_similarity", "check_similarity_vjp", "similarity_core",
           "similarity_vjp_core"]


def check_similarity(x_hat: Any, centroids: Any) -> tuple[Any, Any]:
    """Validate the arguments of :func:`similarity`; returns them in that order."""
    x_hat, centroids = checks.arrays(x_hat=x_hat, centroids=centroids)
    x_hat = checks.sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = checks.centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    return x_hat, centroids


def similarity_core(x_hat: Any, centroids: Any) -> Any:
    """:func:`similarity` of validated arrays of one floating dtype, computed and returned in that dtype."""
    return checks.array_namespace(x_hat, centroids).einsum("bhld,hcd->bhlc", x_hat, centroids, optimize=True)


OVERFLOWS = {
    "similarity": (checks.Overflow("the similarity", ("x_hat", "centroids")),),
    "similarity_vjp": (checks.Overflow("the gradient of the similarity", ("ds", "centroids")),
                       checks.Overflow("the gradient of the similarity", ("ds", "x_hat"))),
}


def similarity(x_hat: Any, centroids: Any) -> np.ndarray:
    """Dot products of the normalized tokens with the centroids of their head.

        S[b, h, t, c] = sum_d x_hat[b, h, t, d] * centroids[h, c, d]

    Args:
        x_hat: (B, H, L, D) normalized queries or keys.
        centroids: (H, C, D) centroid means.

    Returns:
        S, (B, H, L, C) float64. Cost O(B H L C D).
    """
    x_hat, centroids = as_float64(*check_similarity(x_hat, centroids))
    scores = similarity_core(x_hat, centroids)
    checks.check_overflows(scores, OVERFLOWS["similarity"], x_hat=x_hat, centroids=centroids)
    return scores


def check_similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any, Any]:
    """Validate the arguments of :func:`similarity_vjp`; returns them in that order."""
    x_hat, centroids = check_similarity(x_hat, centroids)
    ds = checks.float_array(checks.as_array(ds, "ds"), "ds", rank=4, axes="(B, H, L, C)")
    checks.expect_shape(ds, "ds", x_hat.shape[:3] + (centroids.shape[1],), "(B, H, L, C)")
    return x_hat, centroids, ds


def similarity_vjp_core(x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any]:
    """:func:`similarity_vjp` of validated arrays of one floating dtype, computed and returned in that dtype."""
    xp = checks.array_namespace(x_hat, centroids, ds)
    dx_hat = xp.einsum("bhlc,hcd->bhld", ds, centroids, optimize=True)
    dcentroids = xp.einsum("bhlc,bhld->hcd", ds, x_hat, optimize=True)
    return dx_hat, dcentroids


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`similarity`.

        dx_hat[b, h, t] = sum_c ds[b, h, t, c] μ[h, c],     dμ[h, c] = sum_{b, t} ds[b, h, t, c] x_hat[b, h, t]

    Args:
        x_hat, centroids: the forward inputs; ds: cotangent of S, (B, H, L, C).

    Returns:
        (dx_hat (B, H, L, D), dcentroids (H, C, D)), float64.
    """
    x_hat, centroids, ds = as_float64(*check_similarity_vjp(x_hat, centroids, ds))
    dx_hat, dcentroids = similarity_vjp_core(x_hat, centroids, ds)
    checks.check_overflows((dx_hat, dcentroids), OVERFLOWS["similarity_vjp"], x_hat=x_hat, centroids=centroids, ds=ds)
    return dx_hat, dcentroids
