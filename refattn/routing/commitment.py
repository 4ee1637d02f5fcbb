"""Routing step 8: the commitment loss that pulls tokens towards their centroid
(spec/routing.md, step 8).

    loss = β · mean over the unpadded tokens' elements of (x̂ - μ_{a(x̂)})²,   β = 1e-4

with a the nearest-centroid assignment (:func:`~refattn.routing.assign`). The centroids are a
constant here (stop-gradient): the gradient reaches x̂ only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import padding_mask, sequence

from ._checks import centroid_array
from .centroids import _assign

__all__ = ["commitment_loss", "commitment_loss_vjp"]


def _residual(x_hat, centroids, key_padding_mask):
    x_hat = sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    mask = padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    labels = _assign(x_hat, centroids, mask)
    keep = labels >= 0
    heads = np.broadcast_to(np.arange(x_hat.shape[1])[None, :, None], labels.shape)
    residual = np.where(keep[..., None], x_hat - centroids[heads, np.maximum(labels, 0)], 0.0)
    return residual, int(keep.sum()) * x_hat.shape[3]


def _beta(beta: Any) -> float:
    beta = float(beta)
    if not np.isfinite(beta):
        raise ValueError(f"beta: expected a finite number, got {beta}")
    return beta


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
    beta = _beta(beta)
    residual, count = _residual(x_hat, centroids, key_padding_mask)
    return 0.0 if count == 0 else beta * float(np.sum(residual * residual)) / count


def commitment_loss_vjp(
    x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4, key_padding_mask: Any = None
) -> np.ndarray:
    """Gradient of :func:`commitment_loss` with respect to x̂ (the centroids get none):

        dx̂_bht = dloss · 2β (x̂_bht - μ_{a(x̂_bht)}) / (N D),   0 at padded tokens.

    The assignment is piecewise constant, so it contributes nothing (away from ties).

    Returns:
        dx_hat (B, H, L, D) float64.
    """
    beta = _beta(beta)
    dloss = float(dloss)
    residual, count = _residual(x_hat, centroids, key_padding_mask)
    return residual * 0.0 if count == 0 else residual * (2.0 * beta * dloss / count)
