"""Routing step 8: the commitment loss that pulls tokens towards their centroid
(spec/routing.md, step 8).

    loss = β · mean over the unpadded tokens' elements of (x̂ - μ_{a(x̂)})²,   β = 1e-4

with a the nearest-centroid assignment (:func:`~refattn.routing.assign`). The centroids are a
constant here (stop-gradient): the gradient reaches x̂ only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .centroids import assign_core

__all__ = [
    "commitment_loss",
    "commitment_loss_vjp",
    "check_commitment_loss",
    "check_commitment_loss_vjp",
    "commitment_loss_core",
    "commitment_loss_vjp_core",
]


def check_commitment_loss(
    x_hat: Any, centroids: Any, beta: Any = 1e-4, key_padding_mask: Any = None
) -> tuple[Any, Any, float, Any]:
    """Validate the arguments of :func:`commitment_loss`; returns them in that order (β >= 0)."""
    beta = checks.real_number(beta, "beta", low=0.0)
    x_hat, centroids, key_padding_mask = checks.arrays(x_hat=x_hat, centroids=centroids,
                                                       key_padding_mask=key_padding_mask)
    x_hat = checks.sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = checks.centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    mask = checks.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    return x_hat, centroids, beta, mask


def _residual(x_hat: Any, centroids: Any, mask: Any) -> tuple[Any, Any]:
    """(x̂ - μ_a(x̂), 0 at padding; N D, the number of unpadded elements, a 0-d array)."""
    xp = checks.array_namespace(x_hat, centroids)
    labels = assign_core(x_hat, centroids, key_padding_mask=mask)
    keep = labels >= 0
    heads = xp.broadcast_to(xp.arange(x_hat.shape[1])[None, :, None], labels.shape)
    residual = xp.where(keep[..., None], x_hat - centroids[heads, xp.maximum(labels, 0)], 0.0)
    return residual, keep.sum() * x_hat.shape[3]


def commitment_loss_core(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> Any:
    """:func:`commitment_loss` of validated arguments: a 0-d array of their dtype (not read back)."""
    xp = checks.array_namespace(x_hat, centroids)
    residual, count = _residual(x_hat, centroids, key_padding_mask)
    return beta * xp.sum(residual * residual) / xp.maximum(count, 1)  # no unpadded token: the sum is 0


OVERFLOWS = {
    "commitment_loss": (checks.Overflow("the commitment loss", ("x_hat", "centroids")),),
    "commitment_loss_vjp": (checks.Overflow("the gradient of the commitment loss", ("x_hat", "centroids")),),
}


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> float:
    """β times the mean squared distance of each unpadded token to its nearest centroid.

        loss = β / (N D) · Σ_{unpadded (b, h, t)} ||x̂_bht - μ_{h, a(x̂_bht)}||²

    N being the number of unpadded (b, h, t) triples. With no unpadded token the loss is 0.
    (The TF code averages over padding too, whose x̂ is 0; lucidrains has no mask. Its loss for
    unshared QK is this function applied to q̂ and k̂ concatenated along the sequence.)

    Args:
        x_hat: (B, H, L, D) normalized tokens; centroids: (H, C, D).
        beta: the weight β (default 1e-4).
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        The loss, a Python float.
    """
    x_hat, centroids, beta, key_padding_mask = check_commitment_loss(x_hat, centroids, beta, key_padding_mask)
    x_hat, centroids = as_float64(x_hat, centroids)
    loss = commitment_loss_core(x_hat, centroids, beta=beta, key_padding_mask=key_padding_mask)
    checks.check_overflows(loss, OVERFLOWS["commitment_loss"], x_hat=x_hat, centroids=centroids)
    return float(loss)


def check_commitment_loss_vjp(
    x_hat: Any, centroids: Any, dloss: Any = 1.0, beta: Any = 1e-4, key_padding_mask: Any = None
) -> tuple[Any, Any, float, float, Any]:
    """Validate the arguments of :func:`commitment_loss_vjp`; returns them in that order."""
    x_hat, centroids, beta, key_padding_mask = check_commitment_loss(x_hat, centroids, beta, key_padding_mask)
    dloss = checks.real_number(dloss, "dloss")
    return x_hat, centroids, dloss, beta, key_padding_mask


def commitment_loss_vjp_core(
    x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4, key_padding_mask: Any = None
) -> Any:
    """:func:`commitment_loss_vjp` of validated arguments, computed and returned in their dtype."""
    xp = checks.array_namespace(x_hat, centroids)
    residual, count = _residual(x_hat, centroids, key_padding_mask)
    return residual * (2.0 * beta * dloss / xp.maximum(count, 1))


def commitment_loss_vjp(
    x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4, key_padding_mask: Any = None
) -> np.ndarray:
    """Gradient of :func:`commitment_loss` with respect to x̂ (the centroids get none):

        dx̂_bht = dloss · 2β (x̂_bht - μ_{a(x̂_bht)}) / (N D),   0 at padded tokens.

    The assignment is piecewise constant, so it contributes nothing (away from ties).

    Returns:
        dx_hat (B, H, L, D) float64.
    """
    x_hat, centroids, dloss, beta, key_padding_mask = check_commitment_loss_vjp(
        x_hat, centroids, dloss, beta, key_padding_mask
    )
    x_hat, centroids = as_float64(x_hat, centroids)
    dx_hat = commitment_loss_vjp_core(x_hat, centroids, dloss, beta=beta, key_padding_mask=key_padding_mask)
    checks.check_overflows(dx_hat, OVERFLOWS["commitment_loss_vjp"], x_hat=x_hat, centroids=centroids)
    return dx_hat
