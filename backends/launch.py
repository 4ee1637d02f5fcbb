"""Kernel launch plans: what each CUDA launch of a backend will ask of the device, known before it runs.

A backend that launches CUDA kernels (CuPy, Numba-CUDA) computes every launch from the array shapes
with a plan function, and the launch itself uses that plan's grid, block and shared memory. The same
plan functions, called for a table of realistic shapes, let ``refattn audit`` check CUDA's limits and
each function's device-memory peak on a machine without a GPU: what is audited is what would run.

- :class:`Launch`: one kernel launch (grid, block, shared memory, the largest index it forms);
- :class:`FunctionPlan`: every launch of one public function for one shape and dtype, with its
  planned device-memory peak and the bound that peak must respect;
- :class:`Shape`: the sizes a plan is made for.

A backend exposes its plans through :attr:`refattn.backends.Backend.plans`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535
MAX_BLOCK = (1_024, 1_024, 64)
MAX_THREADS_PER_BLOCK = 1_024
STATIC_SHARED_BYTES = 48 * 1_024
# The largest dynamic shared memory a block may opt in to on the GPUs we target (sm_80: 163 KiB,
# sm_90: 227 KiB); a plan above 48 KiB must say it opts in, and stay within the smaller of the two.
OPT_IN_SHARED_BYTES = 163 * 1_024
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Shape:
    """The sizes a plan is made for: B, H, L, D, Dv, FSAT's K, routing's C and W."""

    batch: int
    heads: int
    length: int
    dim: int
    dim_v: int
    top_k: int = 16
    clusters: int = 1
    window: int = 1

    def label(self) -> str:
        return (f"B{self.batch} H{self.heads} L{self.length} D{self.dim} Dv{self.dim_v} K{self.top_k} "
                f"C{self.clusters} W{self.window}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch.

    ``largest_index`` is the largest element index the kernel forms into any of its arrays (for example
    B·H·L·D - 1 for a kernel that walks q); ``wide_indices`` says whether the kernel computes its
    indices in 64-bit arithmetic. ``shared_opt_in`` says the launch raises the kernel's dynamic
    shared-memory limit above 48 KiB first (``cudaFuncSetAttribute``), as CUDA requires.
    ``bytes_moved`` is the launch's memory-traffic model, the bytes it reads and writes in device
    memory (0 where the backend gives none): what a profiler's DRAM counters are compared with.
    """

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_shared_bytes: int = 0
    static_shared_bytes: int = 0
    shared_opt_in: bool = False
    largest_index: int = 0
    wide_indices: bool = True
    bytes_moved: int = 0

    def violations(self) -> list[str]:
        """Every CUDA limit this launch breaks, in words (empty when it may run)."""
        found = []
        grid_x, grid_y, grid_z = self.grid
        if not 1 <= grid_x <= MAX_GRID_X:
            found.append(f"grid.x = {grid_x} outside [1, {MAX_GRID_X}]")
        for axis, size in (("y", grid_y), ("z", grid_z)):
            if not 1 <= size <= MAX_GRID_YZ:
                found.append(f"grid.{axis} = {size} outside [1, {MAX_GRID_YZ}]")
        for axis, size, limit in zip("xyz", self.block, MAX_BLOCK, strict=True):
            if not 1 <= size <= limit:
                found.append(f"block.{axis} = {size} outside [1, {limit}]")
        threads = self.block[0] * self.block[1] * self.block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            found.append(f"{threads} threads per block > {MAX_THREADS_PER_BLOCK}")
        if self.static_shared_bytes > STATIC_SHARED_BYTES:
            found.append(f"static shared memory {self.static_shared_bytes} B > {STATIC_SHARED_BYTES} B")
        shared = self.static_shared_bytes + self.dynamic_shared_bytes
        if shared > STATIC_SHARED_BYTES and not self.shared_opt_in:
            found.append(f"shared memory {shared} B > {STATIC_SHARED_BYTES} B without the dynamic opt-in")
        if shared > OPT_IN_SHARED_BYTES:
            found.append(f"shared memory {shared} B > {OPT_IN_SHARED_BYTES} B, the most a block may opt in to")
        if self.largest_index > INT32_MAX and not self.wide_indices:
            found.append(f"index {self.largest_index} > 2^31 - 1 in 32-bit index arithmetic")
        return found


@dataclass(frozen=True)
class FunctionPlan:
    """Every launch of one public function (``"fsat.attention"``, ...) for one shape and dtype.

    ``peak_bytes`` is the planned device-memory peak of the call beyond its inputs (outputs, saved
    tensors, temporaries and chunk buffers, from the same chunking decisions the call makes);
    ``bound_bytes`` is the bound it must respect, ``bound`` that bound in words (for example
    "4·B·H·L·(D + Dv) bytes + 256 MiB of chunk buffers").
    """

    backend: str
    function: str
    shape: Shape
    dtype: str
    launches: tuple[Launch, ...]
    peak_bytes: int
    bound_bytes: int
    bound: str

    def violations(self) -> list[str]:
        """Every launch's violations, named by kernel, and a peak above the bound."""
        found = [f"{launch.kernel}: {problem}" for launch in self.launches for problem in launch.violations()]
        if self.peak_bytes > self.bound_bytes:
            found.append(f"device-memory peak {self.peak_bytes} B > the bound {self.bound_bytes} B ({self.bound})")
        return found
