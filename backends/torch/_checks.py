"""Tensor input checks shared by the PyTorch backend (``fsat`` and ``routing``).

The tensor counterparts of :mod:`refattn._validation`: every public function of the backend
validates its arguments first, and a bad argument fails with a message that names the argument,
what was expected and what came, worded like the reference's. On top of the reference's checks:

- every tensor argument of one call must live on one device (``ValueError``, see :func:`same_device`);
- q, k and v (and other arrays that are computed together) must share one dtype (``TypeError``,
  see :func:`same_dtype`);
- arguments must be ``torch.Tensor`` (``TypeError``): NumPy arrays are converted by
  ``Backend.from_numpy``, never implicitly.

Value checks (NaN/Inf, offset ranges) need the data on the host; they are skipped for tensors on
the ``meta`` device (no data) and while ``torch.compile`` traces (a data-dependent branch would
break the graph). Eager calls always run them.

Integer and choice checks (``integer_in_range``, ``one_of``) are the reference's own functions,
re-exported here so that both backends import every check from one place.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn._validation import integer_in_range, one_of

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


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - older torch
        return False


def checking_values(x: torch.Tensor) -> bool:
    """Whether value checks (finite, ranges) run for ``x``: not on ``meta``, not while compiling."""
    return x.device.type != "meta" and not _is_compiling()


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, in one reduction when it is.

    A finite sum implies finite entries (NaN and ±Inf propagate through a sum); a non-finite sum,
    which an overflow of finite entries also gives, is settled by the exact elementwise test.
    """
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def tensor(x: Any, name: str) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _rank(x: torch.Tensor, name: str, rank: int | None, axes: str | None) -> None:
    if rank is not None and x.dim() != rank:
        layout = f" {axes}" if axes else ""
        raise ValueError(f"{name}: expected a {rank}-D tensor{layout}, got shape {tuple(x.shape)}")


def float_tensor(x: Any, name: str, *, rank: int | None = None, axes: str | None = None) -> torch.Tensor:
    """Return ``x`` if it is a finite real floating-point tensor of the given rank, else raise.

    ``TypeError`` for a non-tensor or a non-float dtype (integer, bool, complex); ``ValueError``
    for a wrong rank or NaN/Inf entries. The tensor is returned unchanged (no copy, no cast).
    """
    x = tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
    _rank(x, name, rank, axes)
    if checking_values(x) and x.numel() and not _all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or Inf entries")
    return x


def score_tensor(x: Any, name: str, *, rank: int, axes: str) -> torch.Tensor:
    """Like :func:`float_tensor`, but ``-inf`` is allowed (scores of offsets that have no pair)."""
    x = tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
    _rank(x, name, rank, axes)
    if checking_values(x) and x.numel() and bool((torch.isnan(x) | (x == float("inf"))).any()):
        raise ValueError(f"{name}: expected finite values or -inf, got NaN or +Inf entries")
    return x


def index_tensor(x: Any, name: str, *, rank: int, axes: str) -> torch.Tensor:
    """Return ``x`` as an int64 tensor of the given rank (bool is not an index), or raise."""
    x = tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    _rank(x, name, rank, axes)
    return x.long()


def expect_shape(x: torch.Tensor, name: str, expected: tuple[int | None, ...], axes: str) -> None:
    """Raise unless ``x.shape`` matches ``expected`` (``None`` matches any size)."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        wanted = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {axes} = {wanted}, got {shape}")


def sequence(x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *, feature: int | None = None) -> torch.Tensor:
    """Validate a ``(B, H, L, F)`` float tensor; with ``like = (B, H, L)`` its leading axes must match.

    ``feature`` (when given) fixes F as well. Every axis must be non-empty.
    """
    x = float_tensor(x, name, rank=4, axes=axes)
    if like is not None:
        expect_shape(x, name, (*like, feature), axes)
    if 0 in x.shape:
        raise ValueError(f"{name}: expected every axis of {axes} to be at least 1, got shape {tuple(x.shape)}")
    return x


def length_from_offsets(count: int, name: str) -> int:
    """L from the size 2L - 1 of an offset axis, or raise naming ``name`` if that size is even or 0."""
    if count < 1 or count % 2 == 0:
        raise ValueError(f"{name}: expected 2L - 1 offsets along axis 2 (an odd number, L >= 1), got {count}")
    return (count + 1) // 2


def padding_mask(mask: Any, batch: int | None, length: int) -> torch.Tensor | None:
    """Validate ``key_padding_mask``: None, or a bool tensor (B, L), True = padding.

    ``batch=None`` accepts any B >= 1 (for functions whose batch size no other argument fixes).
    """
    if mask is None:
        return None
    mask = tensor(mask, "key_padding_mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected a bool tensor (True = padding), got dtype {mask.dtype}")
    if batch is None:
        if mask.dim() != 2 or mask.shape[1] != length or mask.shape[0] < 1:
            raise ValueError(f"key_padding_mask: expected shape (B, L) with L = {length}, got {tuple(mask.shape)}")
    elif tuple(mask.shape) != (batch, length):
        raise ValueError(f"key_padding_mask: expected shape (B, L) = ({batch}, {length}), got {tuple(mask.shape)}")
    return mask


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
