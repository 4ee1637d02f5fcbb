"""The Numba-CUDA backend: the interface of spec/interface.md as ``@cuda.jit`` kernels.

The layout is the reference's: :mod:`.fsat` and :mod:`.routing` hold one module per step with the
reference's names, each running the reference's ``check_f`` and its own device core and kernels.
Shared: :mod:`.runtime` (a call's dtype, arrays, planned launches and checks), :mod:`.device` (the
inline device functions), :mod:`.fft` (real FFTs), :mod:`.topk` (exact top-W selection),
:mod:`.kernels` (the registry), :mod:`.plans` (every launch planned for ``refattn audit``).

Runs on a CUDA device, or in Numba's CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1`` is set before
numba is imported (tiny shapes only: the simulator runs each thread in Python). Depends on numba and
numba-cuda only (no CuPy, no torch). Inputs: NumPy arrays (copied to the device, results copied back)
or device arrays (Numba device arrays, anything with ``__cuda_array_interface__``), used in place,
results then of the first device input's kind. float32 and float64 (float16 inputs computed in
float32), computed in float64 if any floating input is float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from refattn.backends import Backend, Capabilities, gpu

from . import fsat, plans, routing
from .runtime import prepare_simulator, simulator

DTYPES = ("float64", "float32")

if simulator():
    prepare_simulator()


def _from_numpy(array: np.ndarray, dtype: str | None = None, device: str = "cuda") -> Any:
    array = np.ascontiguousarray(array)
    if dtype is not None and array.dtype.kind == "f":
        array = array.astype(dtype)
    return cuda.to_device(array)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, (np.ndarray, np.generic, float, int)):
        array = np.asarray(x)
    elif hasattr(x, "copy_to_host"):
        array = x.copy_to_host()
    else:
        array = cuda.as_cuda_array(x).copy_to_host()
    return gpu.widened(array)


def _where() -> tuple[tuple[str, ...], str | None, str]:
    """(devices, reason none, status line)."""
    import numba

    versions = f"numba {numba.__version__}"
    try:
        import importlib.metadata
        versions += f", numba-cuda {importlib.metadata.version('numba-cuda')}"
    except Exception:  # noqa: BLE001 - version string only
        pass
    if simulator():
        return ("cuda",), None, f"{versions}, CUDA simulator (NUMBA_ENABLE_CUDASIM=1; tiny shapes only)"
    try:
        available = cuda.is_available()
    except Exception as error:  # noqa: BLE001 - a broken driver is "no device"
        available, why = False, str(error)
    else:
        why = "no CUDA device or driver found (set NUMBA_ENABLE_CUDASIM=1 to run in the CUDA simulator)"
    if not available:
        return (), why, f"{versions}, unavailable: {why}"
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    return ("cuda",), None, f"{versions}, CUDA device {name} (compute capability {device.compute_capability})"


def _synchronize() -> None:
    """Wait for the CUDA context's queue; nothing to wait for without a device."""
    if simulator() or cuda.is_available():
        cuda.synchronize()


def backend() -> Backend:
    """The Numba-CUDA backend on the current device, or the simulator."""
    devices, unavailable, status = _where()
    return Backend(
        name="numba_cuda",
        fsat=fsat,
        routing=routing,
        capabilities=Capabilities(dtypes=DTYPES, devices=devices, gradients=True, unavailable=unavailable,
                                  algorithms=("fsat", "routing")),
        from_numpy=_from_numpy,
        to_numpy=_to_numpy,
        status=status,
        extra={"simulator": simulator()},
        synchronize=_synchronize,
        plans=plans.plans,
    )
