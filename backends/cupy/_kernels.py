"""Compile (once per device, through CuPy's NVRTC cache) and launch the CUDA kernels of backends/cupy/kernels.

On NumPy arrays (host mode) with ``REFATTN_CUDA_EMULATION=1`` they run instead in the CUDA C
emulation on the CPU (:mod:`.emulation`), through the same module/kernel calls.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _config, emulation


@functools.cache
def _module(filename: str, device_id: int) -> Any:
    import cupy

    source = next(s for s in _config.SOURCES if s.filename == filename)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source.code(), options=_config.COMPILE_OPTIONS, backend="nvrtc",
                                name_expressions=list(source.name_expressions()))
        module.compile()
    return module


@functools.cache
def _emulated_module(filename: str) -> emulation.RawModule:
    source = next(s for s in _config.SOURCES if s.filename == filename)
    return emulation.RawModule(code=source.code(), options=_config.COMPILE_OPTIONS, backend="nvrtc",
                               name_expressions=list(source.name_expressions()), filename=str(source.path))


def function(source: _config.Source, kernel: str, dtype: np.dtype, device_id: int) -> Any:
    """The compiled ``kernel`` instantiated for storage ``dtype`` on CUDA device ``device_id``."""
    return _module(source.filename, device_id).get_function(_config.instantiation(kernel, np.dtype(dtype).name))


def launch(xp: Any, source: _config.Source, kernel: str, dtype: np.dtype, launch: _config.Launch,
           args: tuple[Any, ...]) -> None:
    """Launch ``kernel<dtype>`` with ``launch``'s grid and block on the current device.

    In host mode (xp is NumPy) there is no device: the kernel runs in the CUDA C emulation on the CPU
    when REFATTN_CUDA_EMULATION=1, and otherwise raises RuntimeError naming the kernel.
    """
    if xp is np:
        name = _config.instantiation(kernel, np.dtype(dtype).name)
        if not emulation.enabled():
            raise RuntimeError(
                f"{name}: a CUDA kernel cannot run without a CUDA device (grid {launch.grid}, block {launch.block}); "
                f"{emulation.ENVIRONMENT_VARIABLE}=1 runs it in the CUDA C emulation on the CPU"
            )
        _emulated_module(source.filename).get_function(name)(launch.grid, launch.block, args)
        return
    import cupy

    function(source, kernel, dtype, cupy.cuda.Device().id)(launch.grid, launch.block, args)
