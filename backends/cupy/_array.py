"""Array intake and input validation for the CuPy backend, written against an array namespace ``xp``.

Every public function first turns its array arguments into CuPy arrays on one device
(:func:`arrays`): CuPy arrays as they are, objects exposing ``__cuda_array_interface__`` (Numba
device arrays, CUDA torch tensors) or a CUDA DLPack capsule (``__dlpack__``) without a copy. NumPy
arrays are refused (TypeError), except inside :func:`host_execution`, a testing aid that runs the
host-side logic with NumPy as ``xp`` on a machine without a GPU (the CUDA kernels then refuse to
launch, or run as CUDA C emulated on the CPU with REFATTN_CUDA_EMULATION=1). Arrays on different
devices raise ValueError.

The checks are :mod:`refattn.checks` (same code, same messages, on the device: one reduction and one
read back per array), plus the dtypes the kernels support.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn import checks
from refattn.checks import expect_shape, index_array, padding_mask

from . import _config

__all__ = [
    "acc",
    "arrays",
    "device_of",
    "expect_shape",
    "float_array",
    "host_enabled",
    "host_execution",
    "index_array",
    "padding_mask",
    "result_dtype",
    "sequence",
]

_host = threading.local()

_DLPACK_CUDA = 2  # kDLCUDA in DLPack's DLDeviceType


@contextlib.contextmanager
def host_execution() -> Iterator[None]:
    """Within this context, NumPy arrays are accepted and processed with NumPy as ``xp``.

    For tests of the host-side logic (validation, shapes, dtypes, launch configuration) on machines
    without a GPU. A kernel launch raises RuntimeError, unless REFATTN_CUDA_EMULATION=1 runs it in
    the CUDA C emulation on the CPU (:mod:`.emulation`).
    """
    previous = getattr(_host, "enabled", False)
    _host.enabled = True
    try:
        yield
    finally:
        _host.enabled = previous


def host_enabled() -> bool:
    return getattr(_host, "enabled", False)


def _cupy():
    import cupy

    return cupy


def _is_numpy(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _to_device(x: Any, name: str) -> Any:
    cupy = _cupy()
    if isinstance(x, cupy.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cupy.asarray(x)  # zero-copy view of the producer's memory
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__") and x.__dlpack_device__()[0] == _DLPACK_CUDA:
        try:
            return cupy.from_dlpack(x)  # zero-copy
        except Exception as error:  # e.g. a dtype CuPy has no equivalent for (bfloat16)
            raise TypeError(f"{name}: cannot view this CUDA array as a CuPy array ({error})") from error
    raise TypeError(
        f"{name}: expected a CuPy array (or a CUDA array exposing __cuda_array_interface__ or DLPack), "
        f"got {type(x).__module__}.{type(x).__name__}; move it to the GPU first (cupy.asarray)"
    )


def arrays(**named: Any) -> tuple[Any, dict[str, Any]]:
    """(xp, {name: array or None}) for the named array arguments (None entries stay None).

    CuPy mode: every array on the device of the first; ValueError naming the first that is not.
    Host mode (inside :func:`host_execution`, all arguments NumPy or absent): xp is NumPy.
    """
    present = {name: x for name, x in named.items() if x is not None}
    if host_enabled() and all(_is_numpy(x) for x in present.values()):
        return np, {name: (None if x is None else np.asarray(x)) for name, x in named.items()}
    cupy = _cupy()
    out = {name: (None if x is None else _to_device(x, name)) for name, x in named.items()}
    device = None
    first = None
    for name, x in out.items():
        if x is None:
            continue
        if device is None:
            device, first = x.device.id, name
        elif x.device.id != device:
            raise ValueError(
                f"{name}: expected an array on the device of {first} (CUDA device {device}), got one on CUDA device "
                f"{x.device.id}"
            )
    return cupy, out


def device_of(xp: Any, x: Any) -> Any:
    """A context manager making ``x``'s device current (a no-op in host mode)."""
    if xp is np:
        return contextlib.nullcontext()
    return x.device


def _supported(x: Any, name: str) -> None:
    if x.dtype.kind == "f" and x.dtype.name not in _config.SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: the CuPy backend supports the dtypes {', '.join(_config.SUPPORTED_DTYPES)}, got {x.dtype}"
        )


def float_array(xp: Any, x: Any, name: str, *, rank: int | None = None, axes: str | None = None,
                allow_neg_inf: bool = False) -> Any:
    """:func:`refattn.checks.float_array` of an array of a dtype the kernels support."""
    _supported(x, name)
    return checks.float_array(x, name, rank=rank, axes=axes, allow_neg_inf=allow_neg_inf)


def sequence(xp: Any, x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *,
             feature: int | None = None) -> Any:
    """:func:`refattn.checks.sequence` of an array of a dtype the kernels support."""
    _supported(x, name)
    return checks.sequence(x, name, axes, like, feature=feature)


def result_dtype(*xs: Any) -> np.dtype:
    """The floating dtype of a call's outputs: the promotion of its floating inputs' dtypes."""
    return np.result_type(*[x.dtype for x in xs if x is not None])


def acc(x: Any, dtype: np.dtype) -> Any:
    """``x`` in the accumulation dtype of ``dtype`` (no copy when it already is)."""
    return x.astype(_config.accumulation_dtype(dtype), copy=False)
