"""Host-side plumbing of the Numba-CUDA backend: array kinds, dtypes, validation on device, launches.

Inputs are NumPy arrays (copied to the device, results copied back) or device arrays: Numba device
arrays and any object with ``__cuda_array_interface__`` (CuPy arrays, CUDA torch tensors), which are
viewed without a copy; results are then Numba device arrays. Validation reuses the messages of
:mod:`refattn.checks`: shapes and dtypes are checked on metadata, NaN/Inf with a counting
kernel on the device (no copy of the data).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda

from refattn import checks

from . import _kernels


def simulator() -> bool:
    """Is Numba's CUDA simulator in use (NUMBA_ENABLE_CUDASIM=1 when numba was imported)?"""
    from numba import config
    return bool(config.ENABLE_CUDASIM)


THREADS = 128


def is_device(x: Any) -> bool:
    """Is ``x`` a device array (Numba device array, simulator array, or ``__cuda_array_interface__``)?"""
    if x is None or isinstance(x, np.ndarray):
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    return hasattr(x, "copy_to_host") and hasattr(x, "shape")


def device_view(x: Any) -> Any:
    """A Numba view of a device array, no copy."""
    if hasattr(x, "copy_to_host"):
        return x
    return cuda.as_cuda_array(x)


def _result_kind(x: Any) -> Callable[[Any], Any]:
    """How a Numba device array result is handed back to a caller whose device input is ``x``:
    a CuPy array for CuPy inputs, a CUDA tensor for torch inputs (both views through
    ``__cuda_array_interface__``, no copy), the Numba device array itself otherwise."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        import cupy
        return cupy.asarray
    if module == "torch":
        import torch
        return lambda array: torch.as_tensor(array, device=x.device)
    return lambda array: array


class Call:
    """The arrays of one backend call: the compute dtype, and how results go back: to the host for
    NumPy inputs, otherwise as the kind of the first device input (:func:`_result_kind`)."""

    def __init__(self, *floats: Any) -> None:
        present = [x for x in floats if x is not None]
        devices = [x for x in present if is_device(x)]
        self.device = bool(devices)
        self.result = _result_kind(devices[0]) if devices else None
        kinds = []
        for x in present:
            dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
            kinds.append(dtype)
        floating = [d for d in kinds if d.kind == "f"]
        self.dtype = np.dtype(np.float64) if any(d == np.float64 or d.itemsize > 8 for d in floating) or not floating \
            else np.dtype(np.float32)
        self.kernels = _kernels.compiled(self.dtype.name)

    def put(self, x: Any) -> Any:
        """``x`` on the device in the compute dtype (no copy for device arrays already in that dtype)."""
        if x is None:
            return None
        if is_device(x):
            view = device_view(x)
            if np.dtype(view.dtype) == self.dtype:
                return view
            return cuda.to_device(view.copy_to_host().astype(self.dtype))  # mixed dtypes: one conversion
        return cuda.to_device(np.ascontiguousarray(np.asarray(x), dtype=self.dtype))

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return cuda.device_array(shape, dtype=self.dtype if dtype is None else dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        array = self.empty(shape, dtype)
        if array.size:
            flat = array.reshape(array.size)
            kernel = self.kernels["fill_i1"] if np.dtype(array.dtype).kind == "i" else self.kernels["fill_f1"]
            launch(kernel, array.size, flat, 0 if np.dtype(array.dtype).kind == "i" else self.scalar(0.0))
        return array

    def out(self, x: Any) -> Any:
        """A result: a host NumPy array unless the call had a device input, then that input's kind."""
        if x is None:
            return None
        if self.device:
            return self.result(x) if self.result is not None else x
        return x.copy_to_host()

    def scalar(self, value: float) -> Any:
        return self.dtype.type(value)


def launch(kernel: Any, total: int, *args: Any, threads: int = THREADS) -> None:
    """A 1-D launch covering ``total`` threads (none when total is 0)."""
    if total <= 0:
        return
    threads = min(threads, total)
    kernel[(total + threads - 1) // threads, threads](*args)


def host_small(x: Any) -> np.ndarray:
    """A small metadata array (mask, offsets, members) on the host, for validation and indexing."""
    if x is None:
        return None
    if is_device(x):
        return np.asarray(device_view(x).copy_to_host())
    return np.asarray(x)


# --- validation, with the messages of refattn.checks ----------------------------------------------


def _dtype_of(x: Any) -> np.dtype:
    if is_device(x):
        return np.dtype(device_view(x).dtype)
    return np.asarray(x).dtype


def _shape_of(x: Any) -> tuple[int, ...]:
    if is_device(x):
        return tuple(device_view(x).shape)
    return np.asarray(x).shape


class Meta:
    """Shape and dtype of an array, without touching its data (``expect_shape`` reads these)."""

    def __init__(self, x: Any) -> None:
        self.shape = _shape_of(x)
        self.ndim = len(self.shape)
        self.dtype = _dtype_of(x)


def _count_bad(x: Any, allow_neginf: bool) -> int:
    """Number of NaN/Inf entries (+Inf and NaN only with ``allow_neginf``), counted where ``x`` lives."""
    if not is_device(x):
        array = np.asarray(x)
        if allow_neginf:
            return int(np.count_nonzero(np.isnan(array) | (array == np.inf)))
        return int(array.size - np.count_nonzero(np.isfinite(array)))
    view = device_view(x)
    if view.size == 0:
        return 0
    # The float32 table serves float16 too: the counters only compare values (no float16 table exists).
    kernels = _kernels.compiled("float64" if np.dtype(view.dtype) == np.float64 else "float32")
    counter = cuda.to_device(np.zeros(1, dtype=np.int64))
    shape = tuple(view.shape)
    rank = len(shape)
    if rank not in (1, 2, 3, 4, 5):
        return 0
    # A grid-stride kernel: a capped grid (in the simulator, where every thread costs, a single warp).
    launch(kernels[f"count_bad_{rank}"], min(view.size, 32 if simulator() else 1 << 16), view,
           1 if allow_neginf else 0, counter, threads=32 if simulator() else THREADS)
    return int(counter.copy_to_host()[0])


def float_array(x: Any, name: str, *, rank: int | None = None, axes: str | None = None) -> Meta:
    """:func:`refattn.checks.float_array` on a host or device array; returns its metadata."""
    meta = Meta(x)
    checks.expect_floating(meta, name)
    checks.expect_rank(meta, name, rank, axes)
    bad = _count_bad(x, False)
    if bad:
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or Inf entries")
    return meta


def score_array(x: Any, name: str, *, rank: int, axes: str) -> Meta:
    """:func:`refattn.checks.float_array` with ``allow_neg_inf`` on a host or device array."""
    meta = Meta(x)
    checks.expect_floating(meta, name)
    checks.expect_rank(meta, name, rank, axes)
    if _count_bad(x, True):
        raise ValueError(f"{name}: expected finite values or -inf, got NaN or +Inf entries")
    return meta


def sequence(x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *, feature: int | None = None) -> Meta:
    """:func:`refattn.checks.sequence` on a host or device array."""
    meta = float_array(x, name, rank=4, axes=axes)
    if like is not None:
        checks.expect_shape(meta, name, (*like, feature), axes)
    if 0 in meta.shape:
        raise ValueError(f"{name}: expected every axis of {axes} to be at least 1, got shape {meta.shape}")
    return meta


@functools.lru_cache(maxsize=64)
def _twiddles_host(n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(max(n // 2, 1))
    angle = -2.0 * np.pi * k / n
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


_TWIDDLE_CACHE: dict[tuple[int, str], tuple[Any, Any]] = {}


def twiddles(n: int, dtype: np.dtype) -> tuple[Any, Any]:
    """exp(-2 pi i k / n), k < n/2, on the device (computed once per size and dtype, in float64)."""
    key = (n, np.dtype(dtype).name)
    if key not in _TWIDDLE_CACHE:
        re, im = _twiddles_host(n, key[1])
        _TWIDDLE_CACHE[key] = (cuda.to_device(re), cuda.to_device(im))
    return _TWIDDLE_CACHE[key]


def pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
