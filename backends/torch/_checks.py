"""Tensor input checks of the PyTorch backend (``fsat`` and ``routing``).

The checks and their messages are :mod:`refattn.checks`' (which words them "tensor" for tensors);
this module adds what is particular to tensors:

- arguments must be ``torch.Tensor`` (``TypeError``): NumPy arrays are converted by
  ``Backend.from_numpy``, never implicitly (:func:`tensor`);
- every tensor argument of one call must live on one device (``ValueError``, :func:`same_device`);
- q, k and v (and other arrays that are computed together) must share one dtype (``TypeError``,
  :func:`same_dtype`).

Value checks (NaN/Inf, offset ranges) need the data; :mod:`refattn.checks` skips them for tensors on
the ``meta`` device and while ``torch.compile`` traces (:func:`checking_values`). Eager calls always
run them.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.checks import expect_shape, integer_in_range, length_from_offsets, one_of

__all__ = [
    "integer_in_range",
    "one_of",
    "checking_values",
    "tensor",
    "float_tensor",
    "score_tensor",
    "index_tensor",
    "expect_shape",
    "sequence",
    "length_from_offsets",
    "padding_mask",
    "same_device",
    "same_dtype",
    "compute_dtype",
]

checking_values = checks.values_readable


def tensor(x: Any, name: str) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x: Any, name: str, *, rank: int | None = None, axes: str | None = None) -> torch.Tensor:
    """:func:`refattn.checks.float_array` of a tensor: returned unchanged (no copy, no cast)."""
    return checks.float_array(tensor(x, name), name, rank=rank, axes=axes)


def score_tensor(x: Any, name: str, *, rank: int, axes: str) -> torch.Tensor:
    """Like :func:`float_tensor`, but ``-inf`` is allowed (scores of offsets that have no pair)."""
    return checks.float_array(tensor(x, name), name, rank=rank, axes=axes, allow_neg_inf=True)


def index_tensor(x: Any, name: str, *, rank: int, axes: str) -> torch.Tensor:
    """:func:`refattn.checks.index_array` of a tensor: int64 (bool is not an index)."""
    return checks.index_array(tensor(x, name), name, rank=rank, axes=axes)


def sequence(x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *,
             feature: int | None = None) -> torch.Tensor:
    """:func:`refattn.checks.sequence` of a tensor."""
    return checks.sequence(tensor(x, name), name, axes, like, feature=feature)


def padding_mask(mask: Any, batch: int | None, length: int) -> torch.Tensor | None:
    """:func:`refattn.checks.padding_mask` of a bool tensor (B, L), True = padding, or None."""
    return None if mask is None else checks.padding_mask(tensor(mask, "key_padding_mask"), batch, length)


def same_device(**named: Any) -> torch.device | None:
    """Raise ``ValueError`` unless every tensor among ``named`` lives on one device; return it.

    Non-tensor values (None, ints) are ignored, so callers can pass every argument as it came.
    Call it before the per-argument checks so that a cross-device call fails with this message.
    """
    tensors = {name: x for name, x in named.items() if isinstance(x, torch.Tensor)}
    devices = {x.device for x in tensors.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {x.device}" for name, x in tensors.items())
        raise ValueError(f"{', '.join(tensors)}: expected all tensors on one device, got {listing}")
    return next(iter(devices)) if devices else None


def same_dtype(**named: Any) -> torch.dtype | None:
    """Raise ``TypeError`` unless every float tensor among ``named`` has one dtype; return it."""
    tensors = {name: x for name, x in named.items() if isinstance(x, torch.Tensor)}
    dtypes = {x.dtype for x in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} {x.dtype}" for name, x in tensors.items())
        raise TypeError(f"{', '.join(tensors)}: expected one floating-point dtype, got {listing}")
    return next(iter(dtypes)) if dtypes else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 and float32 as they are, float16/bfloat16 (and others) float32."""
    return dtype if dtype in (torch.float64, torch.float32) else torch.float32
