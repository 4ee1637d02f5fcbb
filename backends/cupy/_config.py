"""Everything about the CUDA kernels that is not CUDA code: sources, compile options, dtypes, launches.

This module imports neither CuPy nor a device: the compile-check test (tests/test_cupy_kernels.py)
and the host-side tests read the same constants that :mod:`._kernels` uses at run time, so what is
compiled in CI is exactly what a GPU would compile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).with_name("kernels")

# The options handed to cupy.RawModule(options=...). CuPy appends "-arch=compute_XY" (or sm_XY) for
# the device and CUPY_IMPLICIT_OPTIONS itself; the compile check adds the same ones.
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17",)
CUPY_IMPLICIT_OPTIONS: tuple[str, ...] = ("-ftz=true",)  # added by cupy.cuda.compiler for every NVRTC build
CHECKED_ARCHS: tuple[str, ...] = ("-arch=compute_80", "-arch=sm_80", "-arch=compute_90", "-arch=sm_90")

# The C++ storage type of every supported NumPy dtype; half is stored as its 16 bits (see the .cu file).
CXX_TYPES: dict[str, str] = {"float64": "double", "float32": "float", "float16": "refattn_half"}
# The accumulation dtype of every supported storage dtype (spec/interface.md, tolerance table).
ACCUMULATION: dict[str, str] = {"float64": "float64", "float32": "float32", "float16": "float32"}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(CXX_TYPES)

# Kernel geometry; VPL and CHUNK must equal REFATTN_VPL and REFATTN_CHUNK in the .cu file (checked by a test).
WARP = 32
VPL = 4
CHUNK = WARP * VPL
WARPS_PER_BLOCK = 4
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class Source:
    """One .cu file and the template kernels it defines; every kernel is instantiated per dtype."""

    filename: str
    kernels: tuple[str, ...]

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.filename

    def code(self) -> str:
        return self.path.read_text()

    def name_expressions(self) -> tuple[str, ...]:
        return tuple(instantiation(kernel, dtype) for kernel in self.kernels for dtype in SUPPORTED_DTYPES)


FSAT_SPARSE = Source(
    "fsat_sparse_attention.cu",
    ("fsat_sparse_forward", "fsat_sparse_backward_query", "fsat_sparse_backward_key"),
)
SOURCES: tuple[Source, ...] = (FSAT_SPARSE,)


def instantiation(kernel: str, dtype: str) -> str:
    """The C++ name expression of ``kernel`` for storage dtype ``dtype``, e.g. ``fsat_sparse_forward<float>``."""
    try:
        return f"{kernel}<{CXX_TYPES[dtype]}>"
    except KeyError:
        raise ValueError(
            f"dtype: the CuPy backend's kernels support {', '.join(SUPPORTED_DTYPES)}, got {dtype}"
        ) from None


@dataclass(frozen=True)
class Launch:
    """Grid and block of one kernel launch, and the row tiling the kernel decodes from blockIdx.x."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    tiles: int  # row tiles per (batch, head): blockIdx.x = bh * tiles + tile
    chunks: int  # column chunks of CHUNK outputs: blockIdx.y


def row_launch(batch_heads: int, length: int, columns: int) -> Launch:
    """One warp per row (query or key) of each (batch, head), WARPS_PER_BLOCK rows per block, and
    ceil(columns / CHUNK) column chunks.

    Raises ValueError (an unsupported configuration) when the grid exceeds CUDA's limits.
    """
    if batch_heads < 1 or length < 1 or columns < 1:
        raise ValueError(f"launch: expected B*H, L and the column count >= 1, got {batch_heads}, {length}, {columns}")
    tiles = -(-length // WARPS_PER_BLOCK)
    chunks = -(-columns // CHUNK)
    blocks = batch_heads * tiles
    if blocks > MAX_GRID_X:
        raise ValueError(
            f"q: B * H * ceil(L / {WARPS_PER_BLOCK}) = {blocks} thread blocks exceed CUDA's grid limit {MAX_GRID_X}; "
            "split the batch"
        )
    if chunks > MAX_GRID_Y:
        raise ValueError(f"v: {columns} feature columns need {chunks} chunks, above CUDA's grid limit {MAX_GRID_Y}")
    return Launch(grid=(blocks, chunks, 1), block=(WARPS_PER_BLOCK * WARP, 1, 1), tiles=tiles, chunks=chunks)


def fft_length(minimum: int) -> int:
    """The smallest n >= minimum whose prime factors are 2, 3, 5 and 7 (sizes cuFFT handles fastest)."""
    if minimum < 1:
        raise ValueError(f"fft length: expected >= 1, got {minimum}")
    best = 1 << max(0, math.ceil(math.log2(minimum)))
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                n = p3
                while n < minimum:
                    n *= 2
                best = min(best, n)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def accumulation_dtype(dtype: np.dtype) -> np.dtype:
    """float64 -> float64; float32 and float16 -> float32 (spec/interface.md, tolerance table)."""
    name = np.dtype(dtype).name
    if name not in ACCUMULATION:
        raise TypeError(f"dtype: the CuPy backend supports {', '.join(SUPPORTED_DTYPES)}, got {name}")
    return np.dtype(ACCUMULATION[name])
