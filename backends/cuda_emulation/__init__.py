"""CUDA C emulated on the CPU: CUDA kernels compiled with g++ and run by host threads.

Test infrastructure, not a GPU, and independent of any backend (it imports neither CuPy nor a CUDA
library): the CuPy backend runs its kernels here on NumPy arrays when ``REFATTN_CUDA_EMULATION=1``,
and any other CUDA C source can be executed the same way. :class:`RawModule` mirrors
``cupy.RawModule``: ``get_function(name)``
returns a kernel called as ``kernel(grid, block, args, shared_mem=0)``, with NumPy arrays where CuPy
takes device arrays and NumPy scalars of the parameters' C types (Python int, float and bool become
int64, float64 and bool, as in CuPy); every argument is checked against the kernel's parameter list.

How a kernel runs (cuda_emulation.h): the source is compiled by g++ (C++20) against a header that
defines CUDA's device-side names (half precision through ``_Float16``). A launch checks CUDA's limits
(sm_90 figures), then runs the grid's blocks one after another, each as blockDim.x * y * z host
threads running together: ``__syncthreads`` is a block barrier and the warp shuffles a rendezvous of
the lanes in the mask. A barrier or shuffle reached after threads of the block (lanes of the mask)
have returned, or a deadlock between them, fails the launch with :class:`KernelFault`. Static
``__shared__`` variables become function statics (blocks never overlap), ``extern __shared__`` arrays
the block's dynamic buffer of exactly ``shared_mem`` bytes; one variable per ``__shared__``
declaration, inside functions.

Builds are cached by content hash in :func:`cache_directory`. In a process started with the
AddressSanitizer runtime preloaded (the variables of :func:`sanitizer_environment`, e.g.
``env $(python -m refattn.backends.cuda_emulation) pytest ...``) modules are built with
``-fsanitize=address,undefined``: an out-of-bounds access or undefined behaviour aborts the process
with a report. Otherwise they are built optimized (-O2).

What it cannot show: races and everything else that depends on timing (threads are ordered only by
the barriers, blocks never overlap), the GPU memory model, speed, bank conflicts, register limits,
and the GPU's rounding choices (-ftz, fused multiply-add): results agree with a GPU's to rounding,
not bit for bit. Atomics, ``__syncwarp``, cooperative groups, textures and streams are not emulated
(such code does not compile).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refattn.backends import native

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "CompileError",
    "KernelFault",
    "LaunchError",
    "RawKernel",
    "RawModule",
    "cache_directory",
    "enabled",
    "sanitizer_environment",
    "sanitizer_loaded",
]

ENVIRONMENT_VARIABLE = "REFATTN_CUDA_EMULATION"
HEADER = Path(__file__).with_name("cuda_emulation.h")
CACHE_KIND = "cuda-emulation"
PURPOSE = "the CUDA C emulation"
CompileError = native.CompileError  # g++ missing, or it rejected the source (the message holds its log)
OPTIMIZED_FLAGS = ("-O2",)
SANITIZED_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=all")

# CUDA's launch limits (compute capability 9.0, the H200 the device checks run on).
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
SHARED_MEMORY_DEFAULT = 48 * 1024  # dynamic shared memory without an opt-in (static is capped at the same)
SHARED_MEMORY_OPT_IN = 227 * 1024  # the most max_dynamic_shared_size_bytes may be raised to


class LaunchError(ValueError):
    """A launch configuration or argument list CUDA would reject."""


class KernelFault(RuntimeError):
    """The kernel did what is undefined on a GPU: a divergent barrier or shuffle, or a deadlock."""


def enabled() -> bool:
    """Whether ``REFATTN_CUDA_EMULATION`` asks for the emulation ("1"; unset, "" or "0": no)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}: expected 0 or 1, got {value!r}")
    return value == "1"


def cache_directory() -> Path:
    """Where builds are kept: $REFATTN_CACHE_DIR/cuda-emulation, else $XDG_CACHE_HOME/refattn/cuda-emulation,
    else ~/.cache/refattn/cuda-emulation."""
    return native.cache_directory(CACHE_KIND)


def sanitizer_loaded() -> bool:
    """Whether this process has the AddressSanitizer runtime loaded (then modules build sanitized)."""
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


def sanitizer_environment() -> dict[str, str]:
    """Environment variables for a Python process that runs sanitized builds: the ASan runtime
    preloaded (it must come first), then libstdc++ (ASan intercepts C++ throws only if it is loaded
    at start-up; Python does not link it), Python's own leaks not reported, UBSan reports with stacks."""
    runtimes = [subprocess.run([native.compiler(PURPOSE), f"-print-file-name={name}"], capture_output=True, text=True,
                               check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    return {"LD_PRELOAD": ":".join(runtimes), "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


# CUDA's shared-memory declarations have no C++ spelling. `extern __shared__ T name[];` becomes a
# pointer to the block's dynamic buffer; `__shared__ T name...;` a function static, registered for
# the size checks.
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?P<type>[^;\[]*?)\s*\b(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?P<declaration>[^;]*?\b(?P<name>\w+)\s*(?:\[[^;]*\])?)\s*;")
_EXTERN_C = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_ALIGNMENT = re.compile(r"(?:__align__|alignas)\s*\(\s*\d+\s*\)")


def _translate(code: str, filename: str, names: Sequence[str]) -> str:
    def dynamic(match: re.Match[str]) -> str:
        kind = _ALIGNMENT.sub("", match["type"]).strip()
        return f"{kind}* const {match['name']} = static_cast<{kind}*>(::refattn_emulation::dynamic_shared());"

    code = _EXTERN_SHARED.sub(dynamic, code)
    code = _STATIC_SHARED.sub(
        r"static \g<declaration>; ::refattn_emulation::static_shared(&\g<name>, sizeof \g<name>);", code)
    entries = [f'#line 1 "{filename} (emulation entry points)"']
    for index, name in enumerate(names):
        entries.append(f'extern "C" const char* refattn_signature_{index}() '
                       f"{{ return ::refattn_emulation::signature(&{name}); }}")
        entries.append(f'extern "C" int refattn_launch_{index}(const unsigned* grid, const unsigned* block, '
                       "unsigned long long shared, unsigned long long shared_limit, void** args, char* error, "
                       "unsigned long long error_size) "
                       f"{{ return ::refattn_emulation::launch(&{name}, grid, block, shared, shared_limit, args, "
                       "error, error_size); }")
    return f'#include "{HEADER}"\n#line 1 "{filename}"\n{code}\n' + "\n".join(entries) + "\n"


def _build(source: str, flags: Sequence[str]) -> Path:
    """The shared library of ``source``, compiled once per content (the header's included) and flags."""
    return native.build(source, ("-std=c++20", "-pthread", *flags), kind=CACHE_KIND, purpose=PURPOSE,
                        includes=(HEADER,))


_LAUNCH_LOCK = threading.Lock()  # the header's gridDim and blockDim are process-wide


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)`` for CUDA C emulated on the CPU.

    ``options`` are NVRTC's; the emulation keeps the macro definitions and include paths (``-D``,
    ``--define-macro``, ``-I``, ``--include-path``) and ignores the others, which choose GPU code
    generation. ``sanitize`` None builds sanitized exactly when the ASan runtime is loaded.
    """

    def __init__(self, code: str, *, options: Sequence[str] = (), backend: str = "nvrtc",
                 name_expressions: Sequence[str] = (), filename: str = "kernel.cu", sanitize: bool | None = None):
        if backend not in ("nvrtc", "nvcc"):
            raise ValueError(f"backend: expected 'nvrtc' or 'nvcc', got {backend!r}")
        self.code = code
        self.filename = filename
        self.options = tuple(options)
        # Like CuPy, extern "C" kernels are found by name; templates need their name expressions.
        self.names = tuple(name_expressions) + tuple(n for n in _EXTERN_C.findall(code) if n not in name_expressions)
        self.sanitize = sanitizer_loaded() if sanitize is None else bool(sanitize)
        self.max_dynamic_shared: dict[str, int] = {}  # per kernel name, as CUDA keeps function attributes
        self._library: Any = None

    def _flags(self) -> tuple[str, ...]:
        kept = tuple(o for o in self.options if o.startswith(("-D", "--define-macro", "-I", "--include-path")))
        return kept + (SANITIZED_FLAGS if self.sanitize else OPTIMIZED_FLAGS)

    def compile(self) -> None:
        """Build (or find in the cache) and load the library of every name retrieved so far."""
        if self._library is not None:
            return
        if self.sanitize and not sanitizer_loaded():
            raise RuntimeError(
                "sanitize: a sanitized build loads only into a process started with the AddressSanitizer runtime "
                f"preloaded; run it with the variables of sanitizer_environment(): {sanitizer_environment()}"
            )
        path = _build(_translate(self.code, self.filename, self.names), self._flags())
        self._library = ctypes.CDLL(str(path))

    def get_function(self, name: str) -> RawKernel:
        """The kernel ``name``: a name expression (``fsat_sparse_forward<float>``) or an extern "C" name."""
        if name not in self.names:
            self.names += (name,)
            self._library = None  # rebuilt with the new entry point on the next launch
        return RawKernel(self, name)

    def _entry(self, name: str) -> tuple[Any, str]:
        self.compile()
        index = self.names.index(name)
        signature = getattr(self._library, f"refattn_signature_{index}")
        signature.restype = ctypes.c_char_p
        return getattr(self._library, f"refattn_launch_{index}"), signature().decode()


def _dims(value: int | Sequence[int], what: str, kernel: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise LaunchError(f"{kernel}: {what}: expected an int or a tuple of 1 to 3 ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


def _scalar(value: Any) -> np.generic:
    if isinstance(value, np.generic):
        return value
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    raise TypeError(f"not a NumPy array or scalar: {type(value).__name__}")


class RawKernel:
    """One kernel of a :class:`RawModule`, launched as ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: RawModule, name: str):
        self.module = module
        self.name = name

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """The most dynamic shared memory a launch may ask for; raising it above 48 KiB is CUDA's opt-in."""
        return self.module.max_dynamic_shared.get(self.name, SHARED_MEMORY_DEFAULT)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if not 0 <= int(value) <= SHARED_MEMORY_OPT_IN:
            raise LaunchError(f"{self.name}: max_dynamic_shared_size_bytes: expected 0 to {SHARED_MEMORY_OPT_IN}, "
                              f"got {value}")
        self.module.max_dynamic_shared[self.name] = int(value)

    def _check(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int) -> None:
        for what, dims, limits in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
            for axis, size, limit in zip("xyz", dims, limits, strict=True):
                if not 1 <= size <= limit:
                    raise LaunchError(f"{self.name}: {what}.{axis} = {size} is outside CUDA's range 1 to {limit} "
                                      f"(grid {grid}, block {block})")
        if block[0] * block[1] * block[2] > MAX_THREADS_PER_BLOCK:
            raise LaunchError(f"{self.name}: block {block} has {block[0] * block[1] * block[2]} threads, above "
                              f"CUDA's limit of {MAX_THREADS_PER_BLOCK} per block")
        limit = self.max_dynamic_shared_size_bytes
        if not 0 <= shared_mem <= limit:
            opt_in = " (raise max_dynamic_shared_size_bytes to opt in)" if shared_mem <= SHARED_MEMORY_OPT_IN else ""
            raise LaunchError(f"{self.name}: shared_mem = {shared_mem} bytes of dynamic shared memory, above the "
                              f"kernel's limit of {limit}{opt_in}")

    def _arguments(self, signature: str, args: Sequence[Any]) -> tuple[Any, list[Any]]:
        """(void* array of argument addresses as cuLaunchKernel takes them, the cells to keep alive)."""
        parameters = signature.split()
        if len(args) != len(parameters):
            raise LaunchError(f"{self.name}: expected {len(parameters)} arguments, got {len(args)}")
        cells: list[Any] = []
        for index, (parameter, arg) in enumerate(zip(parameters, args, strict=True)):
            if parameter.startswith("p"):
                size = int(parameter[1:])
                if not isinstance(arg, np.ndarray):
                    raise LaunchError(f"{self.name}: argument {index} is a pointer: expected a NumPy array, "
                                      f"got {type(arg).__name__}")
                if size and arg.dtype.itemsize != size:
                    raise LaunchError(f"{self.name}: argument {index} points to {size}-byte elements, got an array "
                                      f"of {arg.dtype} ({arg.dtype.itemsize} bytes)")
                cells.append(ctypes.c_void_p(arg.ctypes.data))
                continue
            try:
                value = _scalar(arg)
            except TypeError as error:
                raise LaunchError(f"{self.name}: argument {index}: expected a {np.dtype(parameter)} scalar, "
                                  f"{error}") from None
            if value.dtype.kind + str(value.dtype.itemsize) != parameter:
                raise LaunchError(f"{self.name}: argument {index}: expected a {np.dtype(parameter)} scalar, got "
                                  f"{value.dtype}")
            cells.append(ctypes.create_string_buffer(value.tobytes(), value.dtype.itemsize))
        return (ctypes.c_void_p * len(cells))(*[ctypes.addressof(cell) for cell in cells]), cells

    def __call__(self, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any], *,
                 shared_mem: int = 0) -> None:
        grid, block = _dims(grid, "grid", self.name), _dims(block, "block", self.name)
        self._check(grid, block, int(shared_mem))
        launch, signature = self.module._entry(self.name)
        pointers, _cells = self._arguments(signature, args)
        launch.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_ulonglong] * 2 + [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulonglong]
        error = ctypes.create_string_buffer(4096)
        with _LAUNCH_LOCK:
            failed = launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), int(shared_mem),
                            self.max_dynamic_shared_size_bytes, pointers, error, len(error))
        if failed:
            raise KernelFault(f"{self.name} (grid {grid}, block {block}, CUDA C emulated on the CPU): "
                              f"{error.value.decode()}")
