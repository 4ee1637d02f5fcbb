"""What the two GPU backends (CuPy, Numba-CUDA) share about the arguments they take: an argument is an array,
or a tuple of them (a ``CentroidState``); a tensor that requires grad is refused; float16 and float32 are
computed in float32, anything with float64 in float64 (spec/interface.md, the tolerance table); results read
back to the host are widened as the conformance suite compares them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def leaves(value: Any) -> list[Any]:
    """An argument's items: the argument itself, or the items of a tuple (nested tuples flattened)."""
    if isinstance(value, tuple):
        return [x for item in value for x in leaves(item)]
    return [value]


def map_leaves(function: Callable[[Any], Any], value: Any) -> Any:
    """``function`` on an argument, or on each item of a tuple, rebuilt as the same kind of tuple."""
    if isinstance(value, tuple):
        items = [map_leaves(function, x) for x in value]
        return value._make(items) if hasattr(value, "_make") else tuple(items)
    return function(value)


def compute_dtype(*dtypes: Any) -> np.dtype:
    """float64 if any of the floating ``dtypes`` is float64 (or there is none), else float32."""
    if not dtypes or any(np.dtype(d).itemsize >= 8 for d in dtypes):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def widened(array: np.ndarray) -> np.ndarray:
    """A host array of results as ``Backend.to_numpy`` returns it (spec/interface.md): float64 or int64."""
    return array.astype(np.float64) if array.dtype.kind == "f" else array.astype(np.int64)


def refuse_autograd(name: str, value: Any, backend: str) -> None:
    """TypeError for a tensor ``value`` that requires grad: ``backend`` computes no gradients through autograd,
    and a silent detach would cut the caller's graph."""
    if getattr(value, "requires_grad", False):
        raise TypeError(f"{name}: expected a tensor without autograd, got one that requires grad: the {backend} "
                        f"backend computes no gradients through autograd; pass {name}.detach(), or use "
                        "refattn.get_backend('torch')")
