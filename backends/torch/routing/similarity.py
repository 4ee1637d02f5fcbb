"""Routing step 2 on tensors (reference: :mod:`refattn.routing.similarity`).

Differs from the reference: one batched ``matmul``; the centroids may be of a wider dtype than the
tokens (a layer's float32 state under bfloat16 autocast): both are computed in the wider compute dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.routing.similarity import OVERFLOWS

from ..tensors import check_overflows, checked, compute_dtype, tensors

__all__ = ["similarity", "similarity_vjp", "check_similarity", "check_similarity_vjp", "similarity_core"]


def similarity_core(x_hat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """S (B, H, L, C) of x̂ (B, H, L, D) and μ (H, C, D) of one compute dtype (no checks)."""
    return torch.matmul(x_hat, centroids.transpose(-1, -2).unsqueeze(0))


@checked
def check_similarity(x_hat: Any, centroids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments of :func:`similarity`; returns them in that order."""
    x_hat, centroids = tensors(x_hat=x_hat, centroids=centroids)
    checks.sequence(x_hat, "x_hat", "(B, H, L, D)")
    checks.centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    return x_hat, centroids


def similarity(x_hat: Any, centroids: Any) -> torch.Tensor:
    """S (B, H, L, C) of x_hat's dtype, differentiable in both inputs."""
    x_hat, centroids = check_similarity(x_hat, centroids)
    cd = compute_dtype(x_hat.dtype, centroids.dtype)
    xc, mc = x_hat.to(cd), centroids.to(cd)
    scores = similarity_core(xc, mc)
    check_overflows(scores, OVERFLOWS["similarity"], x_hat=xc, centroids=mc)
    return scores.to(x_hat.dtype)


@checked
def check_similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the arguments of :func:`similarity_vjp`; returns them in that order."""
    x_hat, centroids, ds = tensors(x_hat=x_hat, centroids=centroids, ds=ds)
    check_similarity(x_hat, centroids)
    checks.float_array(ds, "ds", rank=4, axes="(B, H, L, C)")
    checks.expect_shape(ds, "ds", tuple(x_hat.shape[:3]) + (centroids.shape[1],), "(B, H, L, C)")
    return x_hat, centroids, ds


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx_hat (B, H, L, D), dcentroids (H, C, D)) of the inputs' dtypes."""
    x_hat, centroids, ds = check_similarity_vjp(x_hat, centroids, ds)
    cd = compute_dtype(x_hat.dtype, centroids.dtype)
    dsc, xc, mc = ds.to(cd), x_hat.to(cd), centroids.to(cd)
    dx_hat = torch.matmul(dsc, mc.unsqueeze(0))
    dcentroids = torch.matmul(dsc.transpose(-1, -2), xc).sum(dim=0)
    check_overflows((dx_hat, dcentroids), OVERFLOWS["similarity_vjp"], x_hat=xc, centroids=mc, ds=dsc)
    return dx_hat.to(x_hat.dtype), dcentroids.to(centroids.dtype)
