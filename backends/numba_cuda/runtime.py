"""How one call of the Numba-CUDA backend runs: its compute dtype, its arrays, its launches, its checks.

- :class:`Call`: the compute dtype (float64 if any floating input is float64, else float32), the
  kernels of that dtype, device allocations, and every launch, each computed as a
  :class:`refattn.backends.launch.Launch` (grid, block, shared memory, the largest index it forms,
  its traffic model) that the launch then uses; results go back as the inputs came (NumPy arrays for
  NumPy inputs, otherwise the kind of the first device input, with no copy).
- :class:`Planner`: the same calls with no device: arrays are shapes and dtypes, launches are
  recorded, allocations counted (the device-memory peak): what ``refattn audit`` checks is what runs.
- :func:`intake`: the reference's ``check_f`` on the arguments, device arrays standing in by their
  shape and dtype (:class:`FiniteFace`) once a device kernel has counted their NaN and Inf; an
  array with any is copied to the host first, so every message comes from :mod:`refattn.checks`.
  Device inputs of another floating dtype, or not C-contiguous, are converted on the device.

Index arithmetic is 64-bit in every kernel: Numba types array shapes as int64 and widens int32
thread and block indices in arithmetic (``mul.wide.s32`` in the PTX), and no kernel narrows one.
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda

from refattn import checks
from refattn.backends import gpu
from refattn.backends.launch import Launch

from .kernels import KernelTable, compiled, python_kernels, registry

THREADS = 256  # threads per block of the elementwise kernels
REDUCE = 256  # the largest block of the reduction kernels (a power of two)
ROW_LANES = 32  # the most lanes (threads) per row in the row kernels
LANE_FEATURES = 8  # features a lane of a row kernel sums on its own (fewer lanes: a shorter tree)
GRID_STRIDE_BLOCKS = 1_024  # blocks of the grid-stride kernels (a few per multiprocessor)
WATCH_SLOTS = 16  # results whose overflow one call checks, at most


def simulator() -> bool:
    """Is Numba's CUDA simulator in use (NUMBA_ENABLE_CUDASIM=1 when numba was imported)?"""
    from numba import config
    return bool(config.ENABLE_CUDASIM)


SIMULATOR_SWITCH_INTERVAL = 1e-4  # seconds; Python's default is 5 ms


def prepare_simulator() -> None:
    """Two settings for Numba's CUDA simulator (a test tool: called only when it is in use).

    - It runs every CUDA thread as a Python thread, and at each barrier they hand the GIL over, by
      default every 5 ms: at 0.1 ms its barriers run about four times faster (measured on the
      conformance quick grid).
    - numba-cuda's simulator (0.30) creates a block's ``cuda.shared.array`` when the first thread asks,
      checking its table and then filling it with no lock: two threads racing there get different
      arrays and the block computes garbage (rarely with the default switch interval, often with a
      short one). The same method is installed with the check and the fill under a lock; it keeps the
      simulator's frame layout (the array is keyed by its caller's line).
    """
    from numba.cuda import types as simulated_types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> np.ndarray:
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, simulated_types.Type):
            dtype = numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer
            count = self._dynshared_size // dtype.itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)  # the caller's line keys the array, as in the simulator's own method
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array
    sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL)


def is_device(x: Any) -> bool:
    """Is ``x`` a device array (Numba device array, simulator array, or ``__cuda_array_interface__``)?"""
    if x is None or isinstance(x, np.ndarray):
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    return hasattr(x, "copy_to_host") and hasattr(x, "shape")


def device_view(x: Any) -> Any:
    """A Numba view of a device array, no copy."""
    return x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)


def result_kind(x: Any) -> Callable[[Any], Any]:
    """How a Numba device array result goes back to a caller whose device input is ``x``: a CuPy array
    for CuPy inputs, a CUDA tensor for torch inputs (views through ``__cuda_array_interface__``, no
    copy), the Numba device array itself otherwise."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        import cupy
        return cupy.asarray
    if module == "torch":
        import torch
        return lambda array: torch.as_tensor(array, device=x.device)
    return lambda array: array


def _dims(size: int | tuple[int, ...]) -> tuple[int, int, int]:
    sizes = (size,) if isinstance(size, int) else tuple(size)
    return (*sizes, *(1,) * (3 - len(sizes)))  # type: ignore[return-value]


def flat_launch(total: int, threads: int = THREADS) -> tuple[int, int]:
    """(blocks, threads) of a kernel with one thread per element (fewer threads for few elements)."""
    threads = max(1, min(threads, total))
    return -(-total // threads), threads


def grid_stride_launch(total: int, simulated: bool) -> tuple[int, int]:
    """(blocks, threads) of a grid-stride kernel: a bounded grid (a single warp in the simulator,
    where every thread costs) whose threads step over all ``total`` elements."""
    if simulated:
        return 1, max(1, min(32, total))
    blocks, threads = flat_launch(total)
    return min(blocks, GRID_STRIDE_BLOCKS), threads


def row_launch(features: int, rows: int) -> tuple[int, tuple[int, int]]:
    """(blocks, (lanes, rows per block)) of a row kernel: lanes a power of two <= ROW_LANES with about
    LANE_FEATURES features each (one lane, hence no tree and no barrier, up to 8 features), as many
    rows as fit in REDUCE threads (no more than there are, at least one)."""
    lanes = min(ROW_LANES, 1 << max(0, math.ceil(math.log2(-(-features // LANE_FEATURES)))))
    per_block = min(REDUCE // lanes, max(rows, 1))
    return -(-rows // per_block), (lanes, per_block)


class Call:
    """One call of the backend on a CUDA device (or the simulator); see the module docstring."""

    def __init__(self, dtype: Any, result: Callable[[Any], Any] | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.simulated = simulator()
        self.result = result  # None: results go to the host
        self._watched: list[tuple[np.dtype, str, bool, dict[str, Any]]] = []
        self._counters: Any = None

    # ---------------------------------------------------------------- launches

    def plan(self, name: str, grid: int | tuple[int, ...], block: int | tuple[int, ...], args: tuple[Any, ...],
             bytes_moved: int | None = None, dtype: Any = None) -> Launch | None:
        """The launch of kernel ``name`` (of ``dtype``, default the compute dtype) over ``grid`` x ``block``
        with ``args``; None when the grid is empty. The largest index it forms is that of its largest
        array or of its last thread; its traffic model, unless given, every array argument read or
        written once."""
        grid, block = _dims(grid), _dims(block)
        if 0 in grid:
            return None
        arrays = [x for x in args if hasattr(x, "shape")]
        threads = math.prod(grid) * math.prod(block)
        largest = max([threads - 1] + [x.size - 1 for x in arrays])
        moved = sum(x.size * x.dtype.itemsize for x in arrays) if bytes_moved is None else bytes_moved
        kernel = python_kernels(self.kernel_dtype(dtype).name)[name]
        return Launch(name, grid, block, static_shared_bytes=kernel.shared_bytes, largest_index=largest,
                      wide_indices=True, bytes_moved=moved)

    def launch(self, name: str, grid: int | tuple[int, ...], block: int | tuple[int, ...], *args: Any,
               bytes_moved: int | None = None, dtype: Any = None) -> None:
        """Plan the launch (:meth:`plan`) and run it as planned."""
        planned = self.plan(name, grid, block, args, bytes_moved, dtype)
        if planned is not None:
            self.run(planned, args, self.kernel_dtype(dtype))

    def kernel_dtype(self, dtype: Any) -> np.dtype:
        """The dtype of the kernel table a launch uses: ``dtype``, or the compute dtype when None."""
        return self.dtype if dtype is None else np.dtype(dtype)

    def run(self, planned: Launch, args: tuple[Any, ...], dtype: np.dtype) -> None:
        compiled(dtype.name)[planned.kernel][planned.grid, planned.block](*args)

    def flat(self, name: str, total: int, *args: Any, bytes_moved: int | None = None, dtype: Any = None) -> None:
        """A launch with one thread per element of ``total`` (:func:`flat_launch`)."""
        self.launch(name, *flat_launch(total), *args, bytes_moved=bytes_moved, dtype=dtype)

    # ---------------------------------------------------------------- arrays

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return cuda.device_array(shape, dtype=self.dtype if dtype is None else dtype)

    def full(self, shape: tuple[int, ...], value: float, dtype: Any = None) -> Any:
        """A device array filled with ``value`` (by a kernel: nothing crosses from the host)."""
        array = self.empty(shape, dtype)
        if array.size:
            dtype = np.dtype(array.dtype)
            flat = array.reshape(array.size)
            if dtype.kind == "i":
                self.flat("fill_int_k", array.size, flat, int(value))
            else:
                self.flat("fill_k", array.size, flat, dtype.type(value), dtype=dtype)
        return array

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.full(shape, 0, dtype)

    def upload(self, host: Any, dtype: Any = None) -> Any:
        """A host array on the device, in ``dtype`` (default: the compute dtype for floats, its own otherwise)."""
        host = np.asarray(host)
        if dtype is None:
            dtype = self.dtype if host.dtype.kind == "f" else host.dtype
        return cuda.to_device(np.ascontiguousarray(host, dtype=dtype))

    def constant(self, key: tuple[Any, ...], build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[Any, ...]:
        """Device copies of the host arrays ``build()`` makes, made once per ``key`` (twiddle tables)."""
        if key not in _CONSTANTS:
            _CONSTANTS[key] = tuple(cuda.to_device(np.ascontiguousarray(x)) for x in build())
        return _CONSTANTS[key]

    def scalar(self, value: float) -> Any:
        return self.dtype.type(value)

    def host(self, x: Any) -> Any:
        """A device array's values on the host (small arrays, and the error paths)."""
        return x.copy_to_host()

    # ---------------------------------------------------------------- results

    def watch(self, result: Any, where: str, *, allow_neg_inf: bool = False, **operands: Any) -> None:
        """Check ``result`` (a device array, or a tuple of them) for an overflow of the compute dtype, as
        :func:`refattn.checks.check_overflow` does: its NaN and Inf are counted on the device now, read
        with every other watched result's by :meth:`out`, which raises the reference's error."""
        for part in result if isinstance(result, tuple) else (result,):
            if part is None or part.size == 0:
                continue
            if self._counters is None:
                self._counters = self.zeros((WATCH_SLOTS, 2), np.int64)
            slot = len(self._watched)
            if slot == WATCH_SLOTS:
                raise RuntimeError(f"a call watches at most {WATCH_SLOTS} results for overflow")
            count_nonfinite(self, part, self._counters, slot)
            # The result itself is not kept (an intermediate is freed as the reference frees it): the
            # message needs only its dtype and the operands.
            self._watched.append((np.dtype(part.dtype), where, allow_neg_inf, operands))

    def watch_rules(self, results: Any, rules: Any, **arguments: Any) -> None:
        """:meth:`watch` of ``results`` by the reference's overflow rules of a function (its module's
        ``OVERFLOWS[name]``; :func:`refattn.checks.check_overflows`)."""
        checks.check_overflows(results, rules, check=self.watch, **arguments)

    def _raise_overflow(self) -> None:
        if not self._watched:
            return
        counts = self.host(self._counters)
        for slot, (dtype, where, allow_neg_inf, operands) in enumerate(self._watched):
            if counts[slot, 0] or (counts[slot, 1] and not allow_neg_inf):
                host = {name: None if x is None else self.host(x) for name, x in operands.items()}
                checks.check_overflow(np.full(1, np.nan, dtype), where, allow_neg_inf=allow_neg_inf, **host)

    def out(self, *results: Any) -> Any:
        """The results as the caller gets them (after the watched results' overflow check): NumPy arrays
        for NumPy inputs, otherwise the kind of the first device input. One result, or a tuple."""
        self._raise_overflow()
        converted = tuple(None if x is None else (self.host(x) if self.result is None else self.result(x))
                          for x in results)
        return converted[0] if len(converted) == 1 else converted


_CONSTANTS: dict[tuple[Any, ...], tuple[Any, ...]] = {}


class MetaArray:
    """The shape and dtype of an array a :class:`Planner` allocates (no data); views share their base."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, base: MetaArray | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.base = base

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def reshape(self, *shape: Any) -> MetaArray:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return MetaArray(shape, self.dtype, self.base or self)

    def is_c_contiguous(self) -> bool:
        return True


class Planner(Call):
    """A call that plans instead of running: every launch is recorded as planned, every allocation is a
    :class:`MetaArray` whose bytes count until it is freed (the peak is the call's device-memory peak
    beyond its inputs), and nothing is read back."""

    def __init__(self, dtype: Any) -> None:
        super().__init__(dtype)
        self.simulated = False
        self.launches: list[Launch] = []
        self.live = 0
        self.peak = 0
        self._constants: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def run(self, planned: Launch, args: tuple[Any, ...], dtype: np.dtype) -> None:
        self.launches.append(planned)

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> MetaArray:
        array = MetaArray(shape, self.dtype if dtype is None else dtype)
        self.live += array.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(array, self._free, array.nbytes)
        return array

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def input(self, shape: tuple[int, ...], dtype: Any = None) -> MetaArray:
        """An argument of the planned call (not counted: the peak is beyond the inputs)."""
        return MetaArray(shape, self.dtype if dtype is None else dtype)

    def upload(self, host: Any, dtype: Any = None) -> MetaArray:
        host = np.asarray(host)
        return self.empty(host.shape, (self.dtype if host.dtype.kind == "f" else host.dtype) if dtype is None
                          else dtype)

    def constant(self, key: tuple[Any, ...], build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[Any, ...]:
        if key not in self._constants:
            self._constants[key] = tuple(self.empty(x.shape, x.dtype) for x in build())
        return self._constants[key]

    def out(self, *results: Any) -> Any:
        return results[0] if len(results) == 1 else results


# ------------------------------------------------------------------------------------- intake


class FiniteFace(np.ndarray):
    """The host face of a device array for the reference's checks: its shape and dtype, no data (zero
    strides). The device has counted no NaN and no Inf in it, so the checks' two value reads,
    ``sum`` and ``max`` (:func:`refattn.checks.expect_finite`), return 0."""

    # A NumPy array (a subclass): refattn.checks tells array libraries apart by their module's name.
    __module__ = "numpy"

    def sum(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - see the class docstring
        return self.dtype.type(0)

    def max(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.dtype.type(0)


def finite_face(shape: tuple[int, ...], dtype: Any) -> FiniteFace:
    return np.broadcast_to(np.zeros((), dtype=dtype), shape).view(FiniteFace)


def _arrays_in(value: Any) -> list[Any]:
    """The arrays among an argument (an array, or a tuple of them such as a CentroidState)."""
    return [x for x in gpu.leaves(value) if is_device(x) or isinstance(x, np.ndarray)]


def _dtype_of(x: Any) -> np.dtype:
    return np.dtype(device_view(x).dtype) if is_device(x) else np.asarray(x).dtype


def compute_dtype(*values: Any) -> np.dtype:
    """float64 if any floating array among ``values`` is float64 (or wider), else float32; float64
    when there is none."""
    return gpu.compute_dtype(*[_dtype_of(x) for value in values for x in _arrays_in(value) if _dtype_of(x).kind == "f"])


def to_compute_dtype(call: Call, x: Any) -> Any:
    """The device array ``x`` as a C-contiguous array of the compute dtype: ``x`` itself when it is one,
    else converted on the device (a planned cast of a contiguous array; Numba's device-side assignment
    for a strided one)."""
    view = device_view(x)
    dtype = np.dtype(view.dtype)
    if dtype == call.dtype and view.is_c_contiguous():
        return view
    dense = call.empty(tuple(view.shape))
    if view.is_c_contiguous() and view.size:
        name = "cast_half_k" if dtype == np.float16 else "cast_single_k"
        launch = grid_stride_launch(view.size, call.simulated)
        call.launch(name, *launch, view.reshape(view.size), dense.reshape(view.size))
    elif view.size:
        dense[...] = view
    return dense


def count_nonfinite(call: Call, x: Any, counts: Any, slot: int) -> None:
    """counts[slot] += (NaN and +Inf entries, -Inf entries) of the C-contiguous device array ``x``."""
    flat = x.reshape(x.size)
    call.launch("count_nonfinite_k", *grid_stride_launch(x.size, call.simulated), flat, slot, counts,
                bytes_moved=x.size * x.dtype.itemsize)


def intake(check: Callable[..., tuple[Any, ...]], *args: Any) -> tuple[Call, tuple[Any, ...]]:
    """The reference's ``check`` (a ``check_f``) on ``args``, and the :class:`Call` that computes on them.

    Host arrays go to ``check`` as they are. Device float arrays are first in the compute dtype on the
    device and their NaN, +Inf and -Inf counted there (one read back for all); they go to ``check``
    as a :class:`FiniteFace`, or, when any entry is not finite, as a host copy, so that ``check``
    decides (and words) exactly as the reference does. Device arrays of other dtypes (masks,
    indices) go to ``check`` as host copies.

    Returns the call and ``check``'s results with every floating array as a device array of the
    compute dtype (host ones uploaded), every index array as an int64 device array (a device input
    already int64 used as it is), and masks as host bool arrays.
    """
    for name, value in zip(inspect.signature(check).parameters, args, strict=False):
        gpu.refuse_autograd(name, value, "Numba-CUDA")  # before torch refuses its __cuda_array_interface__
    devices = [x for value in args for x in _arrays_in(value) if is_device(x)]
    call = Call(compute_dtype(*args), result_kind(devices[0]) if devices else None)
    floats = [x for x in devices if _dtype_of(x).kind == "f"]
    converted = {id(x): to_compute_dtype(call, x) for x in floats}
    counts = np.zeros((0, 2), dtype=np.int64)
    if floats:
        device_counts = call.zeros((len(floats), 2), np.int64)
        for slot, x in enumerate(floats):
            if converted[id(x)].size:
                count_nonfinite(call, converted[id(x)], device_counts, slot)
        counts = call.host(device_counts)
    faces: dict[int, Any] = {}  # id(face) -> the device array it stands for

    def face(value: Any) -> Any:
        if isinstance(value, tuple):
            return gpu.map_leaves(face, value)
        if not is_device(value):
            return value
        if _dtype_of(value).kind == "f":
            slot = next(i for i, x in enumerate(floats) if x is value)
            dense = converted[id(value)]
            stand_in = finite_face(dense.shape, _dtype_of(value)) if not counts[slot].any() else call.host(dense)
            faces[id(stand_in)] = dense
        else:
            stand_in = np.asarray(call.host(device_view(value)))
            faces[id(stand_in)] = device_view(value)
        return stand_in

    def back(value: Any) -> Any:
        if isinstance(value, tuple):
            return gpu.map_leaves(back, value)
        if not isinstance(value, np.ndarray):
            return value
        original = faces.get(id(value))
        if value.dtype.kind == "f":
            return original if original is not None else call.upload(value)
        if value.dtype.kind == "b":
            return value
        if original is not None and np.dtype(original.dtype) == np.int64:
            return original
        return call.upload(value, np.int64)

    validated = check(*(face(value) for value in args))
    return call, tuple(back(value) for value in validated)


def kernels(dt: Any) -> KernelTable:
    """The utility kernels: fills, device-side conversions, the NaN/Inf counter."""
    from numba import float32

    POS_INF = dt(math.inf)
    NEG_INF = dt(-math.inf)
    table, kernel = registry()

    @kernel("F1 f")
    def fill_k(x, value):
        idx = cuda.grid(1)
        if idx < x.shape[0]:
            x[idx] = value

    @kernel("I1 i")
    def fill_int_k(x, value):
        idx = cuda.grid(1)
        if idx < x.shape[0]:
            x[idx] = value

    @kernel("F1 i I2")
    def count_nonfinite_k(x, slot, counts):
        """counts[slot, 0] += NaN and +Inf entries of x, counts[slot, 1] += -Inf entries: a grid-stride
        loop over the flat array (no index arithmetic per element), one atomic per thread at most."""
        bad = 0
        negative = 0
        for idx in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            value = x[idx]
            if value != value or value == POS_INF:
                bad += 1
            elif value == NEG_INF:
                negative += 1
        if bad:
            cuda.atomic.add(counts, (slot, 0), bad)
        if negative:
            cuda.atomic.add(counts, (slot, 1), negative)

    @kernel("H1 F1")
    def cast_half_k(source, target):
        """target = source, float16 widened to the compute dtype (grid-stride)."""
        for idx in range(cuda.grid(1), source.shape[0], cuda.gridsize(1)):
            target[idx] = source[idx]

    if dt != float32:
        @kernel("S1 F1")
        def cast_single_k(source, target):
            """target = source, float32 widened to float64 (grid-stride)."""
            for idx in range(cuda.grid(1), source.shape[0], cuda.gridsize(1)):
                target[idx] = source[idx]

    return table
