"""Routing step 8 on tensors (reference: :mod:`refattn.routing.commitment`).

Differs from the reference: ``commitment_loss`` returns a 0-d tensor, differentiable in ``x_hat``
(not a Python float), in the accumulation dtype: float64 or float32 as the inputs, float32 for
float16/bfloat16 ones (a scalar loss gains nothing from half precision), the wider of the two when
x_hat and the centroids differ.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.routing.commitment import OVERFLOWS

from ..tensors import check_overflows, checked, compute_dtype
from .centroids import assign_core, check_assign

__all__ = ["commitment_loss", "commitment_loss_vjp", "check_commitment_loss", "check_commitment_loss_vjp",
           "commitment_loss_core", "commitment_loss_vjp_core"]


def residual(x_hat: torch.Tensor, centroids: torch.Tensor,
             mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ - μ_a, 0 at padding) with μ a constant, and N·D as a tensor."""
    labels = assign_core(x_hat, centroids, mask)
    keep = labels >= 0
    heads = centroids.shape[0]
    chosen = centroids.detach()[torch.arange(heads, device=labels.device).reshape(1, heads, 1), labels.clamp(min=0)]
    difference = torch.where(keep.unsqueeze(-1), x_hat - chosen,
                             torch.zeros((), dtype=x_hat.dtype, device=x_hat.device))
    return difference, keep.sum() * x_hat.shape[-1]


def commitment_loss_core(x_hat: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None,
                         beta: float) -> torch.Tensor:
    """The loss, a 0-d tensor of the compute-dtype inputs (no checks); differentiable in x̂."""
    difference, count = residual(x_hat, centroids, mask)
    total = (difference * difference).sum()
    return torch.where(count > 0, beta * total / count.clamp(min=1).to(total.dtype),
                       torch.zeros((), dtype=total.dtype, device=total.device))


@checked
def check_commitment_loss(x_hat: Any, centroids: Any, beta: Any = 1e-4, key_padding_mask: Any = None) -> tuple:
    """Validate the arguments of :func:`commitment_loss`; returns them in that order (β >= 0)."""
    beta = checks.real_number(beta, "beta", low=0.0)
    x_hat, centroids, mask = check_assign(x_hat, centroids, key_padding_mask)
    return x_hat, centroids, beta, mask


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> torch.Tensor:
    """The loss, a 0-d tensor in the accumulation dtype, differentiable in ``x_hat``."""
    x_hat, centroids, beta, mask = check_commitment_loss(x_hat, centroids, beta, key_padding_mask)
    cd = compute_dtype(x_hat.dtype, centroids.dtype)
    xc, mc = x_hat.to(cd), centroids.to(cd)
    loss = commitment_loss_core(xc, mc, mask, beta)
    check_overflows(loss, OVERFLOWS["commitment_loss"], x_hat=xc, centroids=mc)
    return loss


@checked
def check_commitment_loss_vjp(x_hat: Any, centroids: Any, dloss: Any = 1.0, beta: Any = 1e-4,
                              key_padding_mask: Any = None) -> tuple:
    """Validate the arguments of :func:`commitment_loss_vjp`; returns them in that order (``dloss`` a
    real number or a 0-d float tensor)."""
    x_hat, centroids, beta, mask = check_commitment_loss(x_hat, centroids, beta, key_padding_mask)
    if isinstance(dloss, torch.Tensor):
        checks.float_array(dloss, "dloss", rank=0)
    else:
        dloss = checks.real_number(dloss, "dloss")
    return x_hat, centroids, dloss, beta, mask


def commitment_loss_vjp_core(x_hat: torch.Tensor, centroids: torch.Tensor, dloss: Any, mask: torch.Tensor | None,
                             beta: float) -> torch.Tensor:
    """dx̂ of the compute-dtype inputs (no checks)."""
    difference, count = residual(x_hat, centroids, mask)
    if isinstance(dloss, torch.Tensor):
        dloss = dloss.to(device=difference.device, dtype=difference.dtype)
    return difference * (2.0 * beta * dloss / count.clamp(min=1).to(difference.dtype))


def commitment_loss_vjp(x_hat: Any, centroids: Any, dloss: Any = 1.0, *, beta: float = 1e-4,
                        key_padding_mask: Any = None) -> torch.Tensor:
    """dx_hat (B, H, L, D) of x_hat's dtype, 0 at padding."""
    x_hat, centroids, dloss, beta, mask = check_commitment_loss_vjp(x_hat, centroids, dloss, beta, key_padding_mask)
    cd = compute_dtype(x_hat.dtype, centroids.dtype)
    xc, mc = x_hat.to(cd), centroids.to(cd)
    dx_hat = commitment_loss_vjp_core(xc, mc, dloss, mask, beta)
    check_overflows(dx_hat, OVERFLOWS["commitment_loss_vjp"], x_hat=xc, centroids=mc)
    return dx_hat.to(x_hat.dtype)
