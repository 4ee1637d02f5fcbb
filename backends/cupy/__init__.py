"""The CuPy backend: the reference (:mod:`refattn.fsat`, :mod:`refattn.routing`) run on CuPy arrays, plus
only what must differ on a GPU (spec/interface.md; docs/checks-and-cores.md):

- :mod:`.device`: the intake of device arrays (CuPy, DLPack, ``__cuda_array_interface__``), float32
  arithmetic for float32 and float16, the results cast back;
- :mod:`.kernels`: fused CUDA kernels for FSAT's sparse attention (NVRTC, through ``cupy.RawModule``);
- :mod:`.memory`: chunks of heads (and of blocks) that bound every call's temporaries; :mod:`.plans`:
  each function's launches and device-memory peak for given shapes, without a GPU (``refattn audit``).

With ``REFATTN_CUDA_EMULATION=1`` the backend takes NumPy arrays and runs its CUDA C emulated on the CPU
(:mod:`refattn.backends.cuda_emulation`): the whole backend is then testable on a machine without a GPU.
Without a device and without the emulation it still loads, with no device and the reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn.backends import Backend, Capabilities, Strategy, gpu

from . import fsat, memory, plans, routing
from .device import SUPPORTED_DTYPES, emulated

__all__ = ["backend", "device_report", "fsat", "routing"]

EMULATED_DEVICE = "cpu"  # NumPy arrays, CUDA C emulated on the CPU


def device_report() -> tuple[tuple[str, ...], str | None, str]:
    """(devices, the reason none is usable or None, one status line), without raising."""
    import cupy

    if emulated():
        return (EMULATED_DEVICE,), None, (f"CuPy {cupy.__version__}: CUDA C emulated on CPU (REFATTN_CUDA_EMULATION=1: "
                                          "NumPy arrays, kernels compiled with g++)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"] if count else b""
    except Exception as error:  # cudaErrorInsufficientDriver, cudaErrorNoDevice, missing libcuda, ...
        reason = f"no CUDA device ({type(error).__name__}: {error})"
        return (), reason, f"CuPy {cupy.__version__}, {reason}"
    if count < 1:
        reason = "no CUDA device (cupy.cuda.runtime.getDeviceCount() returned 0)"
        return (), reason, f"CuPy {cupy.__version__}, {reason}"
    name = name.decode() if isinstance(name, bytes) else str(name)
    return tuple(f"cuda:{i}" for i in range(count)), None, f"CuPy {cupy.__version__}, CUDA device 0: {name} ({count})"


def _from_numpy(array: np.ndarray, dtype: str | None = None, device: str | None = None) -> Any:
    if dtype is not None and array.dtype.kind == "f":
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype: the CuPy backend supports {', '.join(SUPPORTED_DTYPES)}, got {dtype}")
        array = array.astype(dtype)
    if device == EMULATED_DEVICE or (device is None and emulated()):
        return np.ascontiguousarray(array)
    import cupy

    index = 0 if device in (None, "cuda") else int(str(device).removeprefix("cuda:"))
    with cupy.cuda.Device(index):
        return cupy.asarray(array)


def _to_numpy(x: Any) -> np.ndarray:
    return gpu.widened(x if isinstance(x, np.ndarray) else np.asarray(x.get() if hasattr(x, "get") else x))


def _synchronize(devices: tuple[str, ...]) -> None:
    """Wait for the queues of the CUDA devices (none without a device, nothing to wait for when emulated)."""
    import cupy

    for name in devices:
        if name.startswith("cuda:"):
            cupy.cuda.Device(int(name.removeprefix("cuda:"))).synchronize()


@contextlib.contextmanager
def _chunks_of(chunk_bytes: int) -> Iterator[None]:
    saved, memory.CHUNK_BYTES = memory.CHUNK_BYTES, chunk_bytes
    try:
        yield
    finally:
        memory.CHUNK_BYTES = saved


# The functions that run in chunks. The conformance suite's shapes fit one chunk, so it checks them twice:
# in one chunk, and chunked as finely as the code allows (a head per group, a block per window).
CHUNKED = ("fsat.pair_counts", "fsat.cross", "fsat.cross_vjp", "fsat.select", "fsat.sparse_attention",
           "fsat.sparse_attention_vjp", "fsat.attention", "fsat.attention_vjp", "routing.cluster_attention",
           "routing.cluster_attention_vjp", "routing.local_attention", "routing.local_attention_vjp",
           "routing.assign", "routing.attention", "routing.attention_vjp")
STRATEGIES = (Strategy("one chunk", CHUNKED, functools.partial(_chunks_of, 1 << 62)),
              Strategy("chunked", CHUNKED, functools.partial(_chunks_of, 1)))


def backend() -> Backend:
    """The CuPy backend; never raises for want of a device (``capabilities.devices`` is then empty)."""
    devices, reason, status = device_report()
    return Backend(name="cupy", fsat=fsat, routing=routing, status=status,
                   synchronize=functools.partial(_synchronize, devices),
                   capabilities=Capabilities(dtypes=SUPPORTED_DTYPES, devices=devices, unavailable=reason),
                   from_numpy=_from_numpy, to_numpy=_to_numpy, plans=plans.plans, strategies=STRATEGIES,
                   extra={"emulated": emulated()})
