"""How the CuPy backend takes its arrays, computes in them and gives them back, around the reference's
``check_f`` and ``f_core`` (docs/checks-and-cores.md).

- **Intake** (:func:`on_device`): CuPy arrays as they are; arrays exporting DLPack on a CUDA device (torch
  tensors) through ``cupy.from_dlpack``, which hands the producer CuPy's current stream, so that work
  pending on the producer's stream is ordered before ours; other ``__cuda_array_interface__`` arrays
  (Numba's) through ``cupy.asarray``. No copy; one device per call, current while it runs. A tensor that
  requires grad raises ``TypeError``: this backend has no autograd, and a silent detach would cut the
  caller's graph. With ``REFATTN_CUDA_EMULATION=1``: NumPy arrays, the kernels emulated on the CPU.
- **dtypes** (:func:`mirror`): float64, float32 and float16 (CuPy has no bfloat16), computed in float64
  or float32 and rounded once to the promotion of the inputs' dtypes.
- **Chunks**: a core whose work is independent per (batch, head) may run on groups of heads (:mod:`.memory`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from refattn import checks
from refattn.backends import cuda_emulation, gpu
from refattn.backends.gpu import compute_dtype

from . import memory

SUPPORTED_DTYPES = ("float64", "float32", "float16")
_DLPACK_CUDA = 2  # kDLCUDA in DLPack's DLDeviceType


def emulated() -> bool:
    """Whether ``REFATTN_CUDA_EMULATION=1`` runs the backend on NumPy arrays, its kernels emulated on the CPU."""
    return cuda_emulation.enabled()


def namespace() -> Any:
    """The array library of a call without array arguments: NumPy under emulation, else CuPy."""
    if emulated():
        return np
    import cupy

    return cupy


def _device_array(x: Any, name: str) -> Any:
    """``x`` as a CuPy array (NumPy under emulation), or ``x`` itself if it is not an array."""
    if isinstance(x, np.ndarray):
        if emulated():
            return x
        raise TypeError(f"{name}: expected a CuPy array (or a CUDA array exporting DLPack or "
                        "__cuda_array_interface__), got a NumPy array; move it to the GPU with cupy.asarray "
                        f"({cuda_emulation.ENVIRONMENT_VARIABLE}=1 runs the backend on NumPy arrays, its CUDA C "
                        "emulated on the CPU)")
    is_cupy = type(x).__module__.partition(".")[0] == "cupy"
    on_cuda = hasattr(x, "__dlpack_device__") and not isinstance(x, np.generic) and \
        x.__dlpack_device__()[0] == _DLPACK_CUDA
    if not (is_cupy or on_cuda or hasattr(x, "__cuda_array_interface__")):
        return x  # numbers, lists, profiles: the reference's checks judge them
    gpu.refuse_autograd(name, x, "CuPy")
    import cupy

    if is_cupy:
        return x
    try:
        return cupy.from_dlpack(x) if on_cuda else cupy.asarray(x)
    except Exception as error:  # e.g. a dtype CuPy has no equivalent for (bfloat16)
        raise TypeError(f"{name}: cannot view this CUDA array as a CuPy array ({error})") from error


def _taken(value: Any, name: str, devices: dict[str, int]) -> Any:
    if isinstance(value, tuple):  # a CentroidState
        fields = getattr(value, "_fields", [str(i) for i in range(len(value))])
        items = [_taken(x, f"{name}.{field}", devices) for field, x in zip(fields, value, strict=True)]
        return value._make(items) if hasattr(value, "_make") else tuple(items)
    x = _device_array(value, name)
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        if np.dtype(x.dtype).kind == "f" and np.dtype(x.dtype).name not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the CuPy backend supports the dtypes {', '.join(SUPPORTED_DTYPES)}, "
                            f"got {x.dtype}")
        if not isinstance(x, np.ndarray):
            devices[name] = x.device.id
    return x


def on_device(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with the intake applied to its arguments and their device current while it runs."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        devices: dict[str, int] = {}
        for name, value in bound.arguments.items():
            bound.arguments[name] = _taken(value, name, devices)
        first = next(iter(devices), None)
        for name, device in devices.items():
            if device != devices[first]:
                raise ValueError(f"{name}: expected an array on the device of {first} (CUDA device "
                                 f"{devices[first]}), got one on CUDA device {device}")
        if first is None:
            return function(*bound.args, **bound.kwargs)
        import cupy

        with cupy.cuda.Device(devices[first]):
            return function(*bound.args, **bound.kwargs)

    return call


def _floats(value: Any) -> list[Any]:
    return [x for x in gpu.leaves(value) if hasattr(x, "dtype") and np.dtype(x.dtype).kind == "f"]


def result_dtype(*values: Any) -> np.dtype:
    """The dtype results are returned in: the promotion of the floating arrays among ``values``."""
    return np.result_type(*[x.dtype for value in values for x in _floats(value)])


def cast(value: Any, dtype: Any) -> Any:
    """The floating arrays in ``value`` (an array, None or a tuple of them) in ``dtype``; 0-d: a float."""
    if isinstance(value, tuple):
        return gpu.map_leaves(lambda x: cast(x, dtype), value)
    if not _floats(value):
        return value
    if value.ndim == 0:
        return float(value)  # a scalar loss, read back as the reference returns it
    with np.errstate(over="ignore"):  # float16 results beyond its range are inf, as a GPU's cast makes them
        return value.astype(dtype, copy=False)


def mirror(reference: Callable[..., Any], core: Callable[..., Any] | None = None, *,
           overflow: Sequence[checks.Overflow | None] | None = None, compute: bool | np.dtype = True,
           head_bytes: Callable[[dict[str, Any], int], int] | None = None) -> Callable[..., Any]:
    """The backend's version of the reference's public function ``reference`` (``f``): the intake, the
    reference's ``check_f``, the floating arrays in the compute dtype (``compute`` False: as given; or a
    dtype to compute in), the reference's ``f_core`` (or ``core``), the reference's overflow checks of the
    results, ``OVERFLOWS["f"]`` of its module (or ``overflow``), the cast back.

    With ``head_bytes(checked arguments, compute itemsize)``, the temporaries of one (batch, head), the
    core runs on groups of heads (:mod:`.memory`): (B, H, ...) arguments and results are sliced along
    (B, H), the mask along B, ``w`` and ``centroids`` along H.
    """
    module, name = sys.modules[reference.__module__], reference.__name__
    check, core = getattr(module, f"check_{name}"), core or getattr(module, f"{name}_core")
    rules = getattr(module, "OVERFLOWS", {}).get(name, ()) if overflow is None else overflow
    parameters = inspect.signature(reference).parameters
    keyword_only = [name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY]

    def run(values: dict[str, Any], dtype: np.dtype) -> Any:
        if compute is not False:
            into = compute_dtype(dtype) if compute is True else compute
            values = {name: cast(value, into) for name, value in values.items()}
        result = core(*[values[name] for name in parameters if name not in keyword_only],
                      **{name: values[name] for name in keyword_only})
        checks.check_overflows(result, rules, **values)
        return cast(result, dtype)

    @on_device
    @functools.wraps(reference)
    def function(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(reference).bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(zip(parameters, check(*bound.arguments.values()), strict=True))
        dtype = result_dtype(*values.values())
        if head_bytes is None:
            return run(values, dtype)
        return _by_groups(run, values, dtype, head_bytes(values, compute_dtype(dtype).itemsize))

    return function


_ROLES = {"key_padding_mask": "b", "w": "h", "centroids": "h"}


def _by_groups(run: Callable[..., Any], values: dict[str, Any], dtype: np.dtype, head_bytes: int) -> Any:
    """``run`` on every group of heads, the (B, H, ...) results assembled in arrays of the whole (B, H)."""
    batch, heads = next(v for v in values.values() if hasattr(v, "ndim") and v.ndim > 2).shape[:2]
    whole: list[Any] = []
    for group in memory.groups(batch, heads, memory.per_chunk(head_bytes)):
        sliced = {name: memory.part(value, group, _ROLES.get(name, "bh")) if hasattr(value, "ndim") else value
                  for name, value in values.items()}
        result = run(sliced, dtype)
        parts = result if isinstance(result, tuple) else (result,)
        if not whole:
            xp = checks.array_namespace(*parts)
            whole = [None if p is None else xp.empty((batch, heads) + p.shape[2:], p.dtype) for p in parts]
        for target, piece in zip(whole, parts, strict=True):
            if target is not None:
                target[group] = piece
    return tuple(whole) if isinstance(result, tuple) else whole[0]
