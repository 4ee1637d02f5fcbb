"""The torch backend's CPU kernels, one C++ file per operation, built with g++ on first use
(:mod:`refattn.backends.native`) and called through ctypes on the data of CPU tensors:

- ``fsat_cross.cpp``: FSAT's FFT operands, a head's features transposed (and reversed) into zero-padded rows;
- ``fsat_spectrum.cpp``: FSAT's w-weighted spectrum, each row transformed in cache by torch's MKL (it links
  libtorch_cpu); it is optional (:data:`OPTIONAL`): where torch has no MKL, the spectra take ``torch.fft``;
- ``fsat_sparse_attention.cpp``: FSAT's sparse attention fused, one pass per row;
- ``routing_route.cpp``: routing's top-W selection per centroid, exact with its tie rule, from a few reads of a row;
- ``routing_indexing.cpp``: routing's scatter of cluster rows into token rows, in slot order;
- ``parallel.h``: the split of rows over threads that they share; ``rows.h``: the transposing copy of a tile of
  positions that both of FSAT's FFT kernels use.

Where g++ is missing or fails, :func:`unavailable` says why and the backend takes its torch operations
instead (FSAT: copies of slices and :class:`~refattn.backends.torch.fsat.sparse_attention.SlicedShift`;
routing: ``torch.topk`` and ``index_add_``). The kernels run on ``torch.get_num_threads()`` threads of the
OpenMP runtime torch has loaded (its libgomp): they share torch's thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from refattn import checks
from refattn.backends import native

__all__ = ["SOURCES", "OPTIONAL", "available", "unavailable", "forced", "padded_rows", "weighted_spectrum",
           "sparse_forward", "sparse_backward", "route_rows", "add_rows_into"]

FOLDER = Path(__file__).parent
SOURCES = ("fsat_cross", "fsat_sparse_attention", "routing_route", "routing_indexing")
"""The kernels' files, FOLDER / f"{source}.cpp", a library each; :func:`available` without a source: all of them."""
OPTIONAL = ("fsat_spectrum",)
"""Kernels that need more than g++ (``fsat_spectrum``: torch built with MKL); each is asked for by name, and where
it cannot run its operation takes the torch path while the other kernels still run."""
HEADERS = (FOLDER / "parallel.h", FOLDER / "rows.h")
CACHE_KIND = "torch-cpu"  # the builds' folder under native.cache_directory
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp")
_SUFFIXES = {torch.float32: "float32", torch.float64: "float64"}


def _links(source: str) -> tuple[str, ...]:
    """The libraries ``source`` links besides libgomp: libtorch_cpu (its MKL) for ``fsat_spectrum``."""
    if source != "fsat_spectrum":
        return ()
    folder = Path(torch.__file__).parent / "lib"
    return (f"-L{folder}", "-Wl,--no-as-needed", "-ltorch_cpu", f"-Wl,-rpath,{folder}")  # linked before the source


@functools.cache
def _library(source: str) -> ctypes.CDLL | str:
    """The loaded library of one of :data:`SOURCES` or :data:`OPTIONAL`, or why it cannot be built here."""
    purpose = f"the torch backend's CPU kernels ({source}.cpp)"
    if source == "fsat_spectrum" and not torch.backends.mkl.is_available():
        return f"{purpose} needs a torch built with MKL (torch.backends.mkl.is_available() is False)"
    try:
        path = native.build((FOLDER / f"{source}.cpp").read_text(), FLAGS + _links(source), kind=CACHE_KIND,
                            purpose=purpose, includes=HEADERS)
        return ctypes.CDLL(str(path))
    except native.CompileError as error:
        return str(error)
    except OSError as error:  # an unwritable cache folder, a library the loader rejects
        folder = native.cache_directory(CACHE_KIND)
        return f"{purpose} cannot be built or loaded in {folder}: {error}"


def unavailable(source: str | None = None) -> str | None:
    """Why the CPU kernels (no ``source``) or the optional one of ``source`` cannot run here (no g++, a failed build,
    an unwritable cache, no MKL), or None."""
    sources = SOURCES if source is None else (checks.one_of(source, "source", OPTIONAL),)
    reasons = [library for library in map(_library, sources) if isinstance(library, str)]
    return reasons[0] if reasons else None


_forced: bool | None = None


@contextlib.contextmanager
def forced(use: bool) -> Iterator[None]:
    """Inside the block the CPU operations that have a kernel take it (``use`` True; ``RuntimeError`` where it
    cannot be built) or their torch path (False), instead of the kernel wherever it is built. The conformance
    suite checks both paths this way (the backend's ``strategies``); process-wide, backward passes included."""
    global _forced
    previous, _forced = _forced, checks.flag(use, "use")
    try:
        yield
    finally:
        _forced = previous


def available(x: torch.Tensor, source: str | None = None) -> bool:
    """Whether the kernels (with ``source``: that one of :data:`OPTIONAL`, besides them) take tensors like ``x``: on
    the CPU, float32 or float64, built here, not turned off by :func:`forced`, and not while ``torch.compile`` traces
    (a ctypes call is opaque to it: the torch path compiles without a graph break)."""
    if torch.compiler.is_compiling() or _forced is False or x.device.type != "cpu" or x.dtype not in _SUFFIXES:
        return False
    reason = unavailable() or (None if source is None else unavailable(source))
    if reason is not None and _forced:
        raise RuntimeError(f"the CPU kernels were required but cannot run: {reason}")
    return reason is None


def _pointer(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


def _entry(source: str, name: str, dtype: torch.dtype, returns: Any = None) -> Any:
    """The function ``name`` of ``source``'s library for ``dtype``, returning ``returns`` (a ctypes type or None)."""
    function = getattr(_library(source), f"{name}_{_SUFFIXES[dtype]}")
    function.restype = returns
    return function


def _shape(q: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 6)(*q.shape, v.shape[3], offsets.shape[2])


def _scale(q: torch.Tensor) -> ctypes.c_double:
    return ctypes.c_double(1.0 / math.sqrt(q.shape[3]))


def _threads() -> ctypes.c_int:
    return ctypes.c_int(torch.get_num_threads())


def padded_rows(x: torch.Tensor, rows: torch.Tensor, reverse: bool) -> torch.Tensor:
    """rows[b, 0, f, :L] = x[b, 0, :, f] (reversed along the sequence if ``reverse``) for x (B, 1, L, F) of any
    strides and contiguous rows (B, 1, F, N) of x's dtype, as :func:`~refattn.backends.torch.fsat.cross.padded_rows`;
    returns rows (the padding untouched)."""
    batch, _, length, features = x.shape
    shape = (ctypes.c_int64 * 3)(batch, length, features)
    strides = (ctypes.c_int64 * 3)(x.stride(0), x.stride(2), x.stride(3))
    transpose = _entry("fsat_cross", "fsat_padded_rows", x.dtype)
    transpose(_pointer(x), shape, strides, ctypes.c_int(reverse), _pointer(rows), ctypes.c_int64(rows.shape[-1]),
              _threads())
    return rows


SPECTRUM_CHUNK_BYTES = 64
"""Features per chunk of :func:`weighted_spectrum`: a cache line of a position's features (16 in float32), so the
transposing copy reads each line of a and b once."""


def weighted_spectrum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """mixed (B, H, n // 2 + 1) complex = sum_d w[h, d] rfft(a[b, h, ::-1, d], n) * rfft(b[b, h, :, d], n), summed in
    the order of d, for a and b (B, H, L, F) of any strides and w (H, F), all of one dtype, n >= 2L - 1: the
    numerator's spectrum of :class:`~refattn.backends.torch.fsat.estimate.WeightedCross`. ``RuntimeError`` with
    MKL's status should a transform fail."""
    batch, heads, length, features = a.shape
    chunk = min(features, SPECTRUM_CHUNK_BYTES // a.element_size())
    mixed = torch.empty(batch, heads, n // 2 + 1, dtype=torch.promote_types(a.dtype, torch.complex64))
    rows = a.new_empty(2 * chunk, n + 2)  # scratch, a torch tensor so that memory measurements count it
    spectrum = _entry("fsat_spectrum", "fsat_weighted_spectrum", a.dtype, returns=ctypes.c_long)
    status = spectrum(_pointer(a), _pointer(b), (ctypes.c_int64 * 4)(*a.shape), (ctypes.c_int64 * 4)(*a.stride()),
                      (ctypes.c_int64 * 4)(*b.stride()), _pointer(w.contiguous()), _pointer(mixed),
                      ctypes.c_int64(n), _pointer(rows), ctypes.c_int64(chunk), _threads())
    if status != 0:
        raise RuntimeError(f"MKL's FFT (DFTI) failed with status {status} at length {n}")
    return mixed


def sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                   causal: bool, unpadded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, probs) of :func:`~refattn.backends.torch.fsat.sparse_attention.sparse_attention_forward`."""
    q, k, v, offsets = (x.contiguous() for x in (q, k, v, offsets))
    bias = None if bias is None else bias.contiguous()
    mask = None if unpadded is None else unpadded.to(torch.uint8).contiguous()
    out = q.new_empty(v.shape)
    lse, probs = q.new_empty(q.shape[:3]), q.new_empty(q.shape[:3] + offsets.shape[2:])
    forward = _entry("fsat_sparse_attention", "fsat_sparse_forward", q.dtype)
    forward(*map(_pointer, (q, k, v, offsets, bias, mask)), _shape(q, v, offsets), ctypes.c_int(causal), _scale(q),
            *map(_pointer, (out, lse, probs)), _threads())
    return out, lse, probs


def sparse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, probs: torch.Tensor,
                    lse: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
                    has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias) of :func:`~refattn.backends.torch.fsat.sparse_attention.sparse_attention_backward`."""
    q, k, v, offsets, probs, lse, out, dout = (x.contiguous() for x in (q, k, v, offsets, probs, lse, out, dout))
    dlse = None if dlse is None else dlse.contiguous()
    shape, scale, threads = _shape(q, v, offsets), _scale(q), _threads()
    dz, dq, dk, dv = torch.empty_like(probs), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    backward_query = _entry("fsat_sparse_attention", "fsat_sparse_backward_query", q.dtype)
    backward_key = _entry("fsat_sparse_attention", "fsat_sparse_backward_key", q.dtype)
    backward_query(*map(_pointer, (k, v, offsets, probs, lse, out, dout, dlse)), shape, scale,
                   *map(_pointer, (dz, dq)), threads)
    backward_key(*map(_pointer, (q, offsets, probs, dout, dz)), shape, scale, *map(_pointer, (dk, dv)), threads)
    return dq, dk, dv, dz.sum(dim=2) if has_bias else None


def route_rows(scores: torch.Tensor, window: int, padded: torch.Tensor | None) -> torch.Tensor | None:
    """Members (B, H, C, W) int64 of similarities (B, H, C, L) and padding (B, L) bool or None, as
    :func:`~refattn.backends.torch.routing.route.route_by_centroid`; None when an unpadded score is NaN or
    infinite."""
    batch, heads, clusters, length = scores.shape
    scores = scores.contiguous()
    mask = None if padded is None else padded.to(torch.uint8).contiguous()
    members = torch.empty(batch, heads, clusters, window, dtype=torch.int64)
    route = _entry("routing_route", "routing_route", scores.dtype, returns=ctypes.c_int64)
    failed = route(_pointer(scores), _pointer(mask), *map(ctypes.c_int64, (batch * heads * clusters, length, window,
                   heads * clusters)), _pointer(members), _threads())
    return None if failed else members


def add_rows_into(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[rows[i]] += values[i] in place, in the order of i, for contiguous out (N, F), rows (n,) int64 and
    values (n, F) of out's dtype; returns out."""
    values, rows = values.contiguous(), rows.contiguous()
    add_rows = _entry("routing_indexing", "routing_add_rows", out.dtype)
    add_rows(_pointer(out), _pointer(rows), _pointer(values), *map(ctypes.c_int64, (rows.shape[0], *out.shape)),
             _threads())
    return out
