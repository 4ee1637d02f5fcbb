"""The CuPy backend: the interface of spec/interface.md on CuPy arrays on a CUDA device.

- ``fsat``: cuFFT (``cupy.fft``) for the cross, a stable device sort for the selection, and fused
  CUDA kernels (kernels/fsat_sparse_attention.cu, compiled with NVRTC through ``cupy.RawModule``)
  for the sparse attention forward and backward;
- ``routing``: gathers, batched GEMMs (``cupy.matmul``) and segmented reductions.

Inputs are CuPy arrays, or any CUDA array exposing ``__cuda_array_interface__`` (Numba) or DLPack
(torch), taken without a copy; outputs are CuPy arrays, which torch (``torch.from_dlpack``) and Numba
(``numba.cuda.as_cuda_array``) take without a copy. float64, float32 and float16 (accumulated in
float32); bfloat16 is not supported (CuPy has no bfloat16 dtype).

Without a CUDA device the backend still loads: ``capabilities.devices`` is empty and
``capabilities.unavailable`` says why, so ``refattn conformance`` reports it as skipped.
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from refattn.backends import Backend, Capabilities
from refattn.backends.cupy import _config, fsat, routing

from ._array import host_execution

__all__ = ["backend", "device_report", "fsat", "host_execution", "routing"]


def device_report() -> tuple[tuple[str, ...], str | None, str]:
    """(devices, reason none is usable or None, one status line), without raising."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # cudaErrorInsufficientDriver, cudaErrorNoDevice, missing libcuda, ...
        reason = f"no CUDA device ({type(error).__name__}: {error})"
        return (), reason, f"CuPy {cupy.__version__}, {reason}"
    if count < 1:
        reason = "no CUDA device (cupy.cuda.runtime.getDeviceCount() returned 0)"
        return (), reason, f"CuPy {cupy.__version__}, {reason}"
    devices = tuple(f"cuda:{index}" for index in range(count))
    try:
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # pragma: no cover - properties are informative only
        name = "unknown"
    return devices, None, f"CuPy {cupy.__version__}, CUDA device 0: {name} ({count} visible)"


def _device_index(device: str | None) -> int:
    if device in (None, "cuda"):
        return 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device: expected 'cuda' or 'cuda:N', got {device!r}")


def _from_numpy(array: np.ndarray, dtype: str | None = None, device: str | None = "cuda:0") -> Any:
    array = np.ascontiguousarray(array)
    if dtype is not None and array.dtype.kind == "f":
        if dtype not in _config.SUPPORTED_DTYPES:
            raise TypeError(f"dtype: the CuPy backend supports {', '.join(_config.SUPPORTED_DTYPES)}, got {dtype}")
        array = array.astype(dtype)
    with cupy.cuda.Device(_device_index(device)):
        return cupy.asarray(array)


def _to_numpy(x: Any) -> np.ndarray:
    array = x.get() if isinstance(x, cupy.ndarray) else np.asarray(x)
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    return array


def _synchronize() -> None:
    """Wait for the queues of every visible CUDA device (none without a device)."""
    devices, _, _ = device_report()
    for index in range(len(devices)):
        cupy.cuda.Device(index).synchronize()


def backend() -> Backend:
    """The CuPy backend; never raises for want of a device (capabilities.devices is then empty)."""
    devices, reason, status = device_report()
    return Backend(
        name="cupy",
        fsat=fsat,
        routing=routing,
        capabilities=Capabilities(dtypes=_config.SUPPORTED_DTYPES, devices=devices, gradients=True,
                                  unavailable=reason),
        from_numpy=_from_numpy,
        to_numpy=_to_numpy,
        status=status,
        synchronize=_synchronize,
    )
