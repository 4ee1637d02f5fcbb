"""The torch backend's CPU kernels (fsat_sparse_attention.cpp): FSAT's sparse attention fused, one pass per
row, built with g++ on first use (:mod:`refattn.backends.native`) and called through ctypes on the data
of contiguous CPU tensors.

Where g++ is missing or fails, :func:`unavailable` says why and the backend pairs rows by slices instead
(:class:`~refattn.backends.torch.fsat.sparse_attention.SlicedShift`). The kernels run on
``torch.get_num_threads()`` threads of their own.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import Any

import torch

from refattn.backends import native

__all__ = ["SOURCE", "available", "unavailable", "sparse_forward", "sparse_backward"]

SOURCE = Path(__file__).with_name("fsat_sparse_attention.cpp")
CACHE_KIND = "torch-cpu"  # the builds' folder under native.cache_directory
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-pthread")
_SUFFIXES = {torch.float32: "float32", torch.float64: "float64"}


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it cannot be built here."""
    try:
        path = native.build(SOURCE.read_text(), FLAGS, kind=CACHE_KIND, purpose="the torch backend's CPU kernels")
        return ctypes.CDLL(str(path))
    except native.CompileError as error:
        return str(error)
    except OSError as error:  # an unwritable cache folder, a library the loader rejects
        folder = native.cache_directory(CACHE_KIND)
        return f"the torch backend's CPU kernels cannot be built or loaded in {folder}: {error}"


def unavailable() -> str | None:
    """Why the CPU kernels cannot run here (no g++, a failed build, an unwritable cache), or None."""
    library = _library()
    return library if isinstance(library, str) else None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can take tensors like ``x``: on the CPU, float32 or float64, and built here."""
    return x.device.type == "cpu" and x.dtype in _SUFFIXES and unavailable() is None


def _pointer(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    function = getattr(_library(), f"{name}_{_SUFFIXES[dtype]}")
    function(*args)


def _shape(q: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 6)(*q.shape, v.shape[3], offsets.shape[2])


def _scale(q: torch.Tensor) -> ctypes.c_double:
    return ctypes.c_double(1.0 / math.sqrt(q.shape[3]))


def _threads() -> ctypes.c_int:
    return ctypes.c_int(torch.get_num_threads())


def sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                   causal: bool, unpadded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, probs) of :func:`~refattn.backends.torch.fsat.sparse_attention.sparse_attention_forward`."""
    q, k, v, offsets = (x.contiguous() for x in (q, k, v, offsets))
    bias = None if bias is None else bias.contiguous()
    mask = None if unpadded is None else unpadded.to(torch.uint8).contiguous()
    out = q.new_empty(v.shape)
    lse, probs = q.new_empty(q.shape[:3]), q.new_empty(q.shape[:3] + offsets.shape[2:])
    _call("fsat_sparse_forward", q.dtype, *map(_pointer, (q, k, v, offsets, bias, mask)), _shape(q, v, offsets),
          ctypes.c_int(causal), _scale(q), *map(_pointer, (out, lse, probs)), _threads())
    return out, lse, probs


def sparse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, probs: torch.Tensor,
                    lse: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
                    has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias) of :func:`~refattn.backends.torch.fsat.sparse_attention.sparse_attention_backward`."""
    q, k, v, offsets, probs, lse, out, dout = (x.contiguous() for x in (q, k, v, offsets, probs, lse, out, dout))
    dlse = None if dlse is None else dlse.contiguous()
    shape, scale, threads = _shape(q, v, offsets), _scale(q), _threads()
    dz, dq, dk, dv = torch.empty_like(probs), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call("fsat_sparse_backward_query", q.dtype, *map(_pointer, (k, v, offsets, probs, lse, out, dout, dlse)), shape,
          scale, *map(_pointer, (dz, dq)), threads)
    _call("fsat_sparse_backward_key", q.dtype, *map(_pointer, (q, offsets, probs, dout, dz)), shape, scale,
          *map(_pointer, (dk, dv)), threads)
    return dq, dk, dv, dz.sum(dim=2) if has_bias else None
