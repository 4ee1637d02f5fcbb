"""The kernel registry of the Numba-CUDA backend: every kernel, per floating dtype, with its signature.

Each step module defines its kernels in a ``kernels(dt)`` builder (kernels are built per dtype:
shared-memory tiles and constants are typed with it) and registers each one with ``@kernel(spec,
shared=...)``: the argument types and the bytes of static shared memory it declares (checked
against the PTX by :mod:`.ptx_check`). :func:`python_kernels` gathers every builder, for the PTX
check's explicit signatures; :func:`compiled` wraps them with ``cuda.jit`` (compiled on first
launch, once per argument types).

Spec tokens: ``F<n>`` an n-D array of the dtype, ``I<n>`` an n-D int64 array, ``H<n>`` / ``S<n>``
an n-D float16 / float32 array (device-side conversions), ``f`` a scalar of the dtype, ``i`` an
int64 scalar.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from numba import cuda, float32, float64, int64, types
from numba.types import float16

NUMBA_TYPES = {"float32": float32, "float64": float64}
BUILDERS = (
    "runtime",
    "fft",
    "topk",
    "fsat.cross",
    "fsat.estimate",
    "fsat.select",
    "fsat.sparse_attention",
    "fsat.attention",
    "routing.normalize",
    "routing.similarity",
    "routing.route",
    "routing.cluster_attention",
    "routing.combine",
    "routing.local_attention",
    "routing.centroids",
    "routing.commitment",
)
_ARRAY_TOKENS = {"I": int64, "H": float16, "S": float32}


@dataclass(frozen=True)
class Kernel:
    """A kernel as written (a Python function), its argument spec and its static shared memory in bytes."""

    function: Callable[..., None]
    spec: str
    shared_bytes: int


KernelTable = dict[str, Kernel]


def registry() -> tuple[KernelTable, Callable[..., Callable[[Callable[..., None]], Callable[..., None]]]]:
    """An empty kernel table and the ``@kernel(spec, shared=bytes)`` decorator that fills it (name = function name)."""
    table: KernelTable = {}

    def kernel(spec: str, *, shared: int = 0) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def register(fn: Callable[..., None]) -> Callable[..., None]:
            table[fn.__name__] = Kernel(fn, spec, shared)
            return fn
        return register

    return table, kernel


def signature(spec: str, dt: Any) -> tuple[Any, ...]:
    """Argument types of a kernel from its spec string, for dtype ``dt``."""
    out = []
    for token in spec.split():
        if token == "f":
            out.append(dt)
        elif token == "i":
            out.append(int64)
        elif token[0] == "F":
            out.append(types.Array(dt, int(token[1:]), "A"))
        elif token[0] in _ARRAY_TOKENS:
            out.append(types.Array(_ARRAY_TOKENS[token[0]], int(token[1:]), "A"))
        else:
            raise ValueError(f"bad spec token {token!r}")
    return tuple(out)


@functools.cache
def python_kernels(dtype: str) -> KernelTable:
    """Every kernel of every builder module for ``dtype`` ("float32" or "float64"); names are unique."""
    merged: KernelTable = {}
    for module_name in BUILDERS:
        # Imported here: the step modules import this one.
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, entry in module.kernels(NUMBA_TYPES[dtype]).items():
            if name in merged:
                raise RuntimeError(f"kernel {name!r} is defined by two builder modules")
            merged[name] = entry
    return merged


@functools.cache
def compiled(dtype: str) -> dict[str, Any]:
    """The kernels for ``dtype`` ("float32" or "float64") as CUDA dispatchers (compiled on first launch)."""
    return {name: cuda.jit(entry.function) for name, entry in python_kernels(dtype).items()}
