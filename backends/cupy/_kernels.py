"""Compile (once per device, through CuPy's NVRTC cache) and launch the CUDA kernels of backends/cupy/kernels."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _config


@functools.cache
def _module(filename: str, device_id: int) -> Any:
    import cupy

    source = next(s for s in _config.SOURCES if s.filename == filename)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source.code(), options=_config.COMPILE_OPTIONS, backend="nvrtc",
                                name_expressions=list(source.name_expressions()))
        module.compile()
    return module


def function(source: _config.Source, kernel: str, dtype: np.dtype, device_id: int) -> Any:
    """The compiled ``kernel`` instantiated for storage ``dtype`` on CUDA device ``device_id``."""
    return _module(source.filename, device_id).get_function(_config.instantiation(kernel, np.dtype(dtype).name))


def launch(xp: Any, source: _config.Source, kernel: str, dtype: np.dtype, launch: _config.Launch,
           args: tuple[Any, ...]) -> None:
    """Launch ``kernel<dtype>`` with ``launch``'s grid and block on the current device.

    In host mode (xp is NumPy) there is no device: RuntimeError, naming the kernel (the kernels are
    never emulated on the CPU).
    """
    if xp is np:
        raise RuntimeError(
            f"{_config.instantiation(kernel, np.dtype(dtype).name)}: a CUDA kernel cannot run without a CUDA device "
            f"(grid {launch.grid}, block {launch.block})"
        )
    import cupy

    function(source, kernel, dtype, cupy.cuda.Device().id)(launch.grid, launch.block, args)
