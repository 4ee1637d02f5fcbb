"""Input checks shared by the FSAT steps (thin wrappers over :mod:`refattn._validation`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array


def sequence(
    x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *, feature: int | None = None
) -> np.ndarray:
    """Validate a ``(B, H, L, F)`` float array; with ``like = (B, H, L)`` its leading axes must match.

    ``feature`` (when given) fixes F as well. Every axis must be non-empty. Returns float64.
    """
    array = float_array(x, name, rank=4, axes=axes)
    if like is not None:
        expect_shape(array, name, (*like, feature), axes)
    if 0 in array.shape:
        raise ValueError(f"{name}: expected every axis of {axes} to be at least 1, got shape {array.shape}")
    return array


def length_from_offsets(count: int, name: str) -> int:
    """L from the size 2L - 1 of an offset axis, or raise naming ``name`` if that size is even or 0."""
    if count < 1 or count % 2 == 0:
        raise ValueError(
            f"{name}: expected 2L - 1 offsets along axis 2 (an odd number, L >= 1), got {count}"
        )
    return (count + 1) // 2
