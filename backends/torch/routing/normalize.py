"""Routing step 1 on tensors (reference: :mod:`refattn.routing.normalize`).

Differs from the reference: the ``tacl`` LayerNorm is torch's fused ``layer_norm`` (no affine);
the gradients are autograd's (``normalize_vjp`` included); the ``lucidrains`` norm is clamped with
``clamp``, whose backward at a zero row is dy / eps (not NaN), as the reference's.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.routing.normalize import OVERFLOWS
from refattn.routing.profiles import Profile, get_profile

from ..tensors import check_overflows, checked, compute_dtype, tensors, vjp

__all__ = ["normalize", "normalize_vjp", "check_normalize", "check_normalize_vjp", "normalize_core"]


def normalize_core(x: torch.Tensor, profile: Profile) -> torch.Tensor:
    """The profile's normalization over the last axis of a compute-dtype tensor (no checks)."""
    if profile.norm == "layernorm":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=profile.norm_eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp(min=profile.norm_eps)


def any_rank(x: Any, name: str) -> torch.Tensor:
    """A float tensor of any rank >= 1 whose last axis (D) is non-empty."""
    (x,) = tensors(**{name: x})
    checks.float_array(x, name)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{name}: expected a tensor whose last axis (D) has at least 1 entry, got shape {tuple(x.shape)}")
    return x


@checked
def check_normalize(x: Any, profile: Any = "tacl") -> tuple[torch.Tensor, Profile]:
    """Validate the arguments of :func:`normalize`; returns them in that order."""
    profile = get_profile(profile)
    return any_rank(x, "x"), profile


def normalize(x: Any, *, profile: str = "tacl") -> torch.Tensor:
    """x̂ of x's shape and dtype, differentiable; any rank >= 1."""
    x, profile = check_normalize(x, profile)
    xc = x.to(compute_dtype(x.dtype))
    x_hat = normalize_core(xc, profile)
    check_overflows(x_hat, OVERFLOWS["normalize"], x=xc)
    return x_hat.to(x.dtype)


@checked
def check_normalize_vjp(x: Any, dx_hat: Any, profile: Any = "tacl") -> tuple[torch.Tensor, torch.Tensor, Profile]:
    """Validate the arguments of :func:`normalize_vjp`; returns them in that order."""
    x, profile = check_normalize(x, profile)
    _, dx_hat = tensors(x=x, dx_hat=dx_hat)
    checks.float_array(dx_hat, "dx_hat")
    checks.expect_shape(dx_hat, "dx_hat", tuple(x.shape), "like x")
    return x, dx_hat, profile


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> torch.Tensor:
    """dx of x's shape and dtype."""
    x, dx_hat, profile = check_normalize_vjp(x, dx_hat, profile)
    cd = compute_dtype(x.dtype)
    dy = dx_hat.to(cd)
    (dx,) = vjp(lambda a: normalize_core(a, profile), [x.to(cd)], [dy])
    check_overflows(dx, OVERFLOWS["normalize_vjp"], dx_hat=dy)
    return dx.to(x.dtype)
