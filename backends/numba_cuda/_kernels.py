"""The kernel table of the Numba-CUDA backend: every kernel, per floating dtype, from its builder modules.

Each builder module (:mod:`._fsat_kernels`, :mod:`._clustering_kernels`,
:mod:`._cluster_attention_kernels`) has a ``build(dt)`` that returns its kernels for a Numba float
type as plain Python functions with a signature spec. :func:`python_kernels` merges them (so that
``ptx_check`` compiles each one to PTX with explicit float32 and float64 signatures);
:func:`compiled` wraps them with ``cuda.jit`` (compiled on first launch, once per argument types).

Spec tokens: ``F<n>`` an n-D array of the dtype, ``I<n>`` an n-D int64 array, ``f`` a scalar of
the dtype, ``i`` an int64 scalar.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from numba import cuda, float32, float64, int64, types

TILE = 32  # queries (or keys) per thread block in the attention kernels
CHUNK = 32  # features per shared-memory slab load
REDUCE = 128  # the largest block of the tree reductions (a power of two)
SLAB = TILE * CHUNK  # shared-memory slab size (a literal constant for cuda.shared.array)

NUMBA_TYPES = {"float32": float32, "float64": float64}
BUILDERS = ("_fsat_kernels", "_clustering_kernels", "_cluster_attention_kernels")

KernelTable = dict[str, tuple[Callable[..., None], str]]


def registry() -> tuple[KernelTable, Callable[[str], Callable[[Callable[..., None]], Callable[..., None]]]]:
    """An empty kernel table and the ``@kernel(spec)`` decorator that fills it (name = function name)."""
    table: KernelTable = {}

    def kernel(spec: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def register(fn: Callable[..., None]) -> Callable[..., None]:
            table[fn.__name__] = (fn, spec)
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
        elif token[0] == "I":
            out.append(types.Array(int64, int(token[1:]), "A"))
        else:
            raise ValueError(f"bad spec token {token!r}")
    return tuple(out)


@functools.cache
def python_kernels(dtype: str) -> KernelTable:
    """Every kernel of every builder module for ``dtype`` ("float32" or "float64"); names are unique."""
    merged: KernelTable = {}
    for module_name in BUILDERS:
        # Imported here, not at the top: the builder modules import this module's constants.
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, entry in module.build(NUMBA_TYPES[dtype]).items():
            if name in merged:
                raise RuntimeError(f"kernel {name!r} is defined by two builder modules")
            merged[name] = entry
    return merged


@functools.cache
def compiled(dtype: str) -> dict[str, Any]:
    """The kernels for ``dtype`` ("float32" or "float64") as CUDA dispatchers (compiled on first launch)."""
    return {name: cuda.jit(fn) for name, (fn, _) in python_kernels(dtype).items()}
