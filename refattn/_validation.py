"""Input checks shared by the reference and the backends.

Every public function validates its arguments before computing, so that bad input fails with a
message that names the argument, what was expected and what came, instead of a broadcasting
error deep inside the arithmetic.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np


def float_array(x: Any, name: str, *, rank: int | None = None, axes: str | None = None) -> np.ndarray:
    """Return ``x`` as a finite float64 NumPy array, or raise naming ``name``.

    ``axes`` (for example ``"(B, H, L, D)"``) only words the error message; ``rank`` is checked.
    Integer, boolean and complex inputs are rejected (TypeError): attention inputs are real floats.
    """
    array = np.asarray(x)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {array.dtype}")
    if rank is not None and array.ndim != rank:
        layout = f" {axes}" if axes else ""
        raise ValueError(f"{name}: expected a {rank}-D array{layout}, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or Inf entries")
    return array.astype(np.float64, copy=False)


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


def score_array(x: Any, name: str, *, rank: int, axes: str) -> np.ndarray:
    """Like :func:`float_array`, but ``-inf`` is allowed (scores of offsets that have no pair)."""
    array = np.asarray(x)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {array.dtype}")
    if array.ndim != rank:
        raise ValueError(f"{name}: expected a {rank}-D array {axes}, got shape {array.shape}")
    if np.any(np.isnan(array)) or np.any(array == np.inf):
        raise ValueError(f"{name}: expected finite values or -inf, got NaN or +Inf entries")
    return array.astype(np.float64, copy=False)


def expect_shape(array: np.ndarray, name: str, expected: tuple[int | None, ...], axes: str) -> None:
    """Raise unless ``array.shape`` matches ``expected`` (``None`` matches any size)."""
    ok = array.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, array.shape))
    if not ok:
        wanted = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {axes} = {wanted}, got {array.shape}")


def index_array(x: Any, name: str, *, rank: int, axes: str) -> np.ndarray:
    """Return ``x`` as an int64 array of the given rank, or raise naming ``name``."""
    array = np.asarray(x)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {array.dtype}")
    if array.ndim != rank:
        raise ValueError(f"{name}: expected a {rank}-D array {axes}, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def padding_mask(mask: Any, batch: int, length: int) -> np.ndarray | None:
    """Validate ``key_padding_mask``: None, or a bool array of shape (B, L) with True = padding."""
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.dtype != np.bool_:
        raise TypeError(f"key_padding_mask: expected a bool array (True = padding), got dtype {array.dtype}")
    if array.shape != (batch, length):
        raise ValueError(f"key_padding_mask: expected shape (B, L) = ({batch}, {length}), got {array.shape}")
    return array


def integer_in_range(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int if ``low <= value <= high`` (no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: expected an integer in {bound}, got {value}")
    return int(value)


def one_of(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
