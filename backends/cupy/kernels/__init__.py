"""The CuPy backend's CUDA C kernels (fsat_sparse_attention.cu): sources, launch plans, compilation, launches.

Compiled by NVRTC through ``cupy.RawModule`` once per device, or, on NumPy arrays (``REFATTN_CUDA_EMULATION=1``),
by g++ in :mod:`refattn.backends.cuda_emulation`, through the same calls. Every launch is computed by
:func:`row_launch`, which the plans of :mod:`..plans` call too.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from refattn.backends import cuda_emulation
from refattn.backends.launch import MAX_GRID_X, Launch

SOURCE = Path(__file__).with_name("fsat_sparse_attention.cu")
KERNELS = ("fsat_sparse_forward", "fsat_sparse_backward_query", "fsat_sparse_backward_key")
CXX_TYPES = {"float64": "double", "float32": "float", "float16": "refattn_half"}  # half stored as its 16 bits
COMPILE_OPTIONS = ("--std=c++17",)
# Geometry; VALUES_PER_LANE is REFATTN_VPL of the source (a test checks it).
WARP, VALUES_PER_LANE, WARPS_PER_BLOCK = 32, 4, 4
COLUMNS = WARP * VALUES_PER_LANE  # output columns one block covers (blockIdx.y enumerates chunks of them)


def instantiation(kernel: str, dtype: Any) -> str:
    """The C++ name expression of ``kernel`` for a storage dtype, e.g. ``fsat_sparse_forward<float>``."""
    return f"{kernel}<{CXX_TYPES[np.dtype(dtype).name]}>"


def name_expressions() -> list[str]:
    return [instantiation(kernel, dtype) for kernel in KERNELS for dtype in CXX_TYPES]


def heads_per_launch(length: int) -> int:
    """The most heads one launch covers: its grid.x, heads * ceil(L / WARPS_PER_BLOCK), within CUDA's limit."""
    return max(1, MAX_GRID_X // -(-length // WARPS_PER_BLOCK))


def row_launch(kernel: str, heads: int, length: int, columns: int, largest_index: int) -> Launch:
    """One warp per row (query or key) of each of ``heads`` (batch, head) pairs, WARPS_PER_BLOCK rows per
    block: grid.x = heads * ceil(L / WARPS_PER_BLOCK), grid.y = ceil(columns / COLUMNS) chunks of the
    output columns. Indices are 64-bit in the kernels."""
    tiles = -(-length // WARPS_PER_BLOCK)
    return Launch(kernel, grid=(heads * tiles, -(-columns // COLUMNS), 1), block=(WARP * WARPS_PER_BLOCK, 1, 1),
                  largest_index=largest_index, wide_indices=True)


@functools.cache
def _module(device: int | None) -> Any:
    """The compiled module for CUDA device ``device``, or for the emulation (None)."""
    if device is None:
        return cuda_emulation.RawModule(code=SOURCE.read_text(), options=COMPILE_OPTIONS,
                                        name_expressions=name_expressions(), filename=str(SOURCE))
    import cupy

    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=SOURCE.read_text(), options=COMPILE_OPTIONS, backend="nvrtc",
                                name_expressions=name_expressions())
        module.compile()
    return module


def launch(plan: Launch, dtype: Any, args: tuple[Any, ...]) -> None:
    """Run ``plan.kernel`` for storage ``dtype`` with the plan's grid and block: on the current CUDA device
    for CuPy arrays, emulated on the CPU for NumPy arrays (``REFATTN_CUDA_EMULATION=1``)."""
    if isinstance(args[0], np.ndarray):
        device = None
    else:
        import cupy

        device = cupy.cuda.Device().id
    _module(device).get_function(instantiation(plan.kernel, dtype))(plan.grid, plan.block, args)
