"""Input checks, and the array helpers shared by the reference and the backends.

Every public function validates its arguments before it computes, so that bad input fails with a
message that names the argument, what was expected and what came, instead of a broadcasting error
deep inside the arithmetic. This module holds every check and every message; the reference's step
modules, the CuPy backend (which runs the reference's code on CuPy arrays) and, where it fits, the
torch and Numba backends call these functions rather than retyping them.

**Namespaces.** The checks are written against the array's own namespace (:func:`array_namespace`):

- NumPy and CuPy arrays: every check.
- torch tensors: the metadata checks (dtype kind, rank, shape, masks) and the value checks
  (finiteness, :func:`check_overflow`); messages say "tensor" instead of "array". Value checks are
  skipped on the ``meta`` device and while ``torch.compile`` traces (no data, or no eager branch).
- Any object with ``shape`` and ``dtype`` (a Numba device array's metadata): the metadata checks.

:func:`arrays` is the intake of the reference's functions: it takes NumPy and CuPy arrays as they
are, turns Python numbers and lists into NumPy arrays, and rejects the arrays of other libraries (a
torch tensor) with a ``TypeError`` that names the argument and points to the backend for them.

**Cost.** A value check is one reduction over its array and one read of the result (on a device: one
host synchronisation); no temporary of the array's size is made unless the check fails (or, for the
finiteness test, unless the sum of finite entries overflows), and only then is the culprit located.

**Errors.** ``TypeError`` for a wrong type or dtype; ``ValueError`` for a wrong rank, shape, range or
value, and for an overflow of a computation (:func:`check_overflow`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "array_namespace",
    "fft_namespace",
    "values_readable",
    "arrays",
    "as_array",
    "as_float64",
    "expect_floating",
    "expect_rank",
    "expect_shape",
    "expect_finite",
    "float_array",
    "sequence",
    "index_array",
    "padding_mask",
    "length_from_offsets",
    "offsets_array",
    "members_array",
    "centroid_array",
    "integer_in_range",
    "flag",
    "real_number",
    "one_of",
    "shared_keys",
    "check_overflow",
    "Overflow",
    "check_overflows",
]


# ------------------------------------------------------------------------------------- namespaces


def _library(x: Any) -> str:
    """The top-level package that defines ``type(x)``: ``"numpy"``, ``"cupy"``, ``"torch"``, ..."""
    return type(x).__module__.partition(".")[0]


def array_namespace(*arrays: Any) -> ModuleType:
    """The namespace of ``arrays`` (None entries are skipped): ``cupy`` if one is a CuPy array,
    ``torch`` if one is a torch tensor, else ``numpy``.

    The reference's cores call NumPy-compatible functions on it (``xp.einsum``, ``xp.where``, ...), so
    they run on NumPy and CuPy arrays; torch is returned for the value checks only.
    """
    for x in arrays:
        if x is not None and _library(x) in ("cupy", "torch"):
            return sys.modules[_library(x)]
    return np


def fft_namespace(xp: ModuleType) -> ModuleType:
    """SciPy's FFT interface for ``xp``: ``scipy.fft`` for NumPy, ``cupyx.scipy.fft`` (cuFFT) for CuPy."""
    if xp.__name__ == "cupy":
        import cupyx.scipy.fft

        return cupyx.scipy.fft
    import scipy.fft

    return scipy.fft


def _noun(x: Any) -> str:
    return "tensor" if _library(x) == "torch" else "array"


def values_readable(x: Any) -> bool:
    """Whether the values of ``x`` can be read now: not a torch tensor without data (``meta``) nor
    one that ``torch.compile`` is tracing (a data-dependent branch would break its graph)."""
    if _library(x) != "torch":
        return True
    is_compiling = getattr(sys.modules["torch"].compiler, "is_compiling", None)  # torch >= 2.3
    return x.device.type != "meta" and not (is_compiling is not None and is_compiling())


def _size(x: Any) -> int:
    return math.prod(x.shape)


def _sum_dtype(x: Any) -> Any:
    """float64 for float64 arrays, float32 for narrower ones: a float16 sum would overflow at 65504."""
    if _library(x) == "torch":
        torch = sys.modules["torch"]
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    return np.float64 if x.dtype == np.float64 else np.float32


def _detached(x: Any) -> Any:
    """``x`` out of autograd's graph (torch): a value read back is no part of it, and torch warns about
    "converting a tensor with requires_grad=True to a scalar" otherwise."""
    return x.detach() if _library(x) == "torch" else x


def _sum(x: Any) -> float:
    """The sum of ``x``'s entries, read back (a NumPy overflow of finite entries gives inf silently)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(_detached(x).sum(dtype=_sum_dtype(x)))


def _dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _dtype_kind(x: Any) -> str:
    """NumPy's dtype kind (``"f"``, ``"c"``, ``"b"``, ``"i"``, ``"u"``, ...), also for torch dtypes."""
    if _library(x) == "torch":
        dtype = x.dtype
        if dtype.is_floating_point:
            return "f"
        if dtype.is_complex:
            return "c"
        return "b" if str(dtype) == "torch.bool" else "i"
    return np.dtype(x.dtype).kind


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _with_dtype(x: Any) -> Any:
    """``x`` itself if it has a shape and a dtype (an array, a tensor, metadata), else NumPy's reading
    of it (None and other objects become object arrays, which the dtype checks refuse)."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


# ------------------------------------------------------------------------------------------ intake

_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__cuda_array_interface__", "__dlpack__")


def as_array(x: Any, name: str) -> Any:
    """``x`` as an array of a namespace the reference's code runs on, or None if it is None.

    NumPy and CuPy arrays are returned as they are; Python numbers, lists and tuples and NumPy
    scalars become NumPy arrays. An array of another library raises ``TypeError`` naming ``name``
    (a torch tensor: pointing to ``refattn.get_backend("torch")``), rather than being converted
    silently: that would hide a copy from the device and drop the tensor's autograd graph.
    """
    if x is None or isinstance(x, np.ndarray) or _library(x) == "cupy":
        return x
    if isinstance(x, (list, tuple, int, float, complex, np.generic)):
        return np.asarray(x)
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    if _library(x) == "torch":
        raise TypeError(
            f"{name}: expected a NumPy array, got {kind}: the reference computes on NumPy arrays; for torch "
            f"tensors use refattn.get_backend('torch') (or pass {name}.detach().cpu().numpy())"
        )
    if any(hasattr(x, protocol) for protocol in _ARRAY_PROTOCOLS):
        raise TypeError(f"{name}: expected a NumPy array, got {kind}; convert it with numpy.asarray first")
    return np.asarray(x)  # anything else: NumPy says what it makes of it (an object array fails the dtype checks)


def arrays(**named: Any) -> tuple[Any, ...]:
    """:func:`as_array` of every named argument, returned in the order given; all of one namespace.

    Mixing NumPy and CuPy arrays in one call raises ``TypeError`` naming the first argument that
    differs from the first array's namespace.
    """
    converted = {name: as_array(x, name) for name, x in named.items()}
    first = None
    for name, x in converted.items():
        if x is None:
            continue
        if first is None:
            first = (name, _library(x))
        elif _library(x) != first[1]:
            raise TypeError(
                f"{name}: expected a {first[1]} array like {first[0]} (one call, one array library), "
                f"got a {_library(x)} array"
            )
    return tuple(converted.values())


def as_float64(*xs: Any) -> Any:
    """The arrays as float64 (no copy when they already are), None staying None: the reference's
    promotion. One array gives one result, several a tuple (as ``numpy.atleast_1d``)."""
    converted = tuple(None if x is None else x.astype(np.float64, copy=False) for x in xs)
    return converted[0] if len(converted) == 1 else converted


# --------------------------------------------------------------------------------- array checks


def expect_floating(x: Any, name: str) -> None:
    """``TypeError`` unless ``x`` has a real floating-point dtype (integer, bool, complex are refused)."""
    if _dtype_kind(x) != "f":
        raise TypeError(f"{name}: expected a real floating-point {_noun(x)}, got dtype {x.dtype}")


def expect_rank(x: Any, name: str, rank: int | None, axes: str | None = None) -> None:
    """``ValueError`` unless ``x`` has ``rank`` axes (None: any); ``axes`` (e.g. ``"(B, H, L, D)"``)
    only words the message."""
    if rank is not None and len(x.shape) != rank:
        layout = f" {axes}" if axes else ""
        raise ValueError(f"{name}: expected a {rank}-D {_noun(x)}{layout}, got shape {_shape(x)}")


def expect_shape(x: Any, name: str, expected: tuple[int | None, ...], axes: str) -> None:
    """``ValueError`` unless ``x.shape`` matches ``expected`` (``None`` matches any size)."""
    shape = _shape(x)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=True))
    if not ok:
        wanted = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {axes} = {wanted}, got {shape}")


def expect_finite(x: Any, name: str, *, allow_neg_inf: bool = False) -> None:
    """``ValueError`` if ``x`` holds NaN or ±Inf (with ``allow_neg_inf``: NaN or +Inf).

    One reduction: a finite sum implies finite entries (NaN and ±Inf propagate through a sum); only a
    non-finite sum, which finite entries whose sum overflows also give, is settled entry by entry.
    With ``allow_neg_inf`` the reduction is the maximum, which is NaN or +Inf exactly when an entry is.
    """
    if not values_readable(x) or _size(x) == 0:
        return
    xp = array_namespace(x)
    if allow_neg_inf:
        if not float(_detached(x).max()) < math.inf:
            raise ValueError(f"{name}: expected finite values or -inf, got NaN or +Inf entries")
        return
    if math.isfinite(_sum(x)):
        return
    bad = int(xp.count_nonzero(~xp.isfinite(x)))
    if bad:
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or Inf entries")


def float_array(x: Any, name: str, *, rank: int | None = None, axes: str | None = None,
                allow_neg_inf: bool = False) -> Any:
    """``x`` if it is a real floating-point array of the given rank with finite values (or -inf, with
    ``allow_neg_inf``: the scores of offsets without a pair), else raise naming ``name``.

    Returned unchanged: no copy, no cast (the caller promotes to its compute dtype).
    """
    x = _with_dtype(x)
    expect_floating(x, name)
    expect_rank(x, name, rank, axes)
    expect_finite(x, name, allow_neg_inf=allow_neg_inf)
    return x


def sequence(x: Any, name: str, axes: str, like: tuple[int, ...] | None = None, *, feature: int | None = None) -> Any:
    """Validate a ``(B, H, L, F)`` float array; with ``like = (B, H, L)`` its leading axes must match,
    and with ``feature`` its last axis too. Every axis must be non-empty."""
    x = float_array(x, name, rank=4, axes=axes)
    if like is not None:
        expect_shape(x, name, (*like, feature), axes)
    if 0 in _shape(x):
        raise ValueError(f"{name}: expected every axis of {axes} to be at least 1, got shape {_shape(x)}")
    return x


def index_array(x: Any, name: str, *, rank: int, axes: str) -> Any:
    """``x`` as an int64 array of the given rank (bool is not an index), or raise naming ``name``."""
    x = _with_dtype(x)
    if _dtype_kind(x) not in "iu":
        raise TypeError(f"{name}: expected an integer {_noun(x)}, got dtype {x.dtype}")
    expect_rank(x, name, rank, axes)
    return x.long() if _library(x) == "torch" else x.astype(np.int64, copy=False)


def padding_mask(mask: Any, batch: int | None, length: int) -> Any:
    """Validate ``key_padding_mask``: None, or a bool array (B, L), True = padding.

    ``batch=None`` accepts any B >= 1 (for functions whose batch size no other argument fixes).
    """
    if mask is None:
        return None
    mask = _with_dtype(mask)
    noun = _noun(mask)
    if _dtype_kind(mask) != "b":
        raise TypeError(f"key_padding_mask: expected a bool {noun} (True = padding), got dtype {mask.dtype}")
    shape = _shape(mask)
    if batch is None:
        if len(shape) != 2 or shape[1] != length or shape[0] < 1:
            raise ValueError(f"key_padding_mask: expected shape (B, L) with L = {length}, got {shape}")
    elif shape != (batch, length):
        raise ValueError(f"key_padding_mask: expected shape (B, L) = ({batch}, {length}), got {shape}")
    return mask


def length_from_offsets(count: int, name: str) -> int:
    """L from the size 2L - 1 of an offset axis, or raise naming ``name`` if that size is even or 0."""
    if count < 1 or count % 2 == 0:
        raise ValueError(f"{name}: expected 2L - 1 offsets along axis 2 (an odd number, L >= 1), got {count}")
    return (count + 1) // 2


def offsets_array(offsets: Any, batch: int, heads: int, length: int) -> Any:
    """Validate FSAT's ``offsets`` (B, H, K): integers in [-(L-1), L-1], distinct per (batch, head),
    K >= 1; returned as int64. NumPy and CuPy arrays."""
    offsets = index_array(offsets, "offsets", rank=3, axes="(B, H, K)")
    expect_shape(offsets, "offsets", (batch, heads, None), "(B, H, K)")
    if offsets.shape[2] < 1:
        raise ValueError(f"offsets: expected at least one offset per (batch, head), got shape {_shape(offsets)}")
    xp = array_namespace(offsets)
    if int(xp.abs(offsets).max()) > length - 1:
        raise ValueError(
            f"offsets: expected offsets in [-(L-1), L-1] = [{-(length - 1)}, {length - 1}], "
            f"got values in [{int(offsets.min())}, {int(offsets.max())}]"
        )
    if bool(xp.any(xp.diff(xp.sort(offsets, axis=-1), axis=-1) == 0)):
        raise ValueError("offsets: expected distinct offsets within each (batch, head), got a repeated offset")
    return offsets


def members_array(members: Any, name: str, batch: int, heads: int, length: int) -> Any:
    """Validate a routing member array (B, H, C, W): positions in [0, L) or -1 (an empty slot),
    distinct within a cluster; returned as int64. NumPy and CuPy arrays."""
    members = index_array(members, name, rank=4, axes="(B, H, C, W)")
    expect_shape(members, name, (batch, heads, None, None), "(B, H, C, W)")
    if 0 in _shape(members):
        raise ValueError(f"{name}: expected every axis of (B, H, C, W) to be at least 1, got shape {_shape(members)}")
    xp = array_namespace(members)
    if bool(xp.any((members < -1) | (members >= length))):
        raise ValueError(
            f"{name}: expected positions in [0, L) = [0, {length}) or -1 for an empty slot, "
            f"got values in [{int(members.min())}, {int(members.max())}]"
        )
    filled = xp.sort(members, axis=-1)
    if bool(xp.any((xp.diff(filled, axis=-1) == 0) & (filled[..., 1:] >= 0))):
        raise ValueError(f"{name}: expected distinct positions within each cluster, got a repeated position")
    return members


def centroid_array(centroids: Any, heads: int | None, dim: int | None, name: str = "centroids") -> Any:
    """Validate the ``(H, C, D)`` centroid means against the heads and feature size of the sequence
    (None: any)."""
    centroids = float_array(centroids, name, rank=3, axes="(H, C, D)")
    expect_shape(centroids, name, (heads, None, dim), "(H, C, D)")
    if 0 in _shape(centroids):
        raise ValueError(f"{name}: expected every axis of (H, C, D) to be at least 1, got shape {_shape(centroids)}")
    return centroids


# ------------------------------------------------------------------------------ other arguments


def integer_in_range(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` as an int if ``low <= value <= high`` (no upper bound when ``high`` is None).

    Python and NumPy integers are integers; bool, floats (even 2.0) and strings are not (``TypeError``).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: expected an integer {bound}, got {value}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool if it is one (Python or NumPy bool); ``TypeError`` otherwise (``'yes'``, 1, None)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def real_number(value: Any, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number in ``[low, high]`` (None: unbounded).

    Python and NumPy integers and floats are numbers; bool and strings are not (``TypeError``). NaN,
    ±Inf and values out of range raise ``ValueError``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {number}")
    if (low is not None and number < low) or (high is not None and number > high):
        bound = f"in [{low:g}, {high:g}]" if low is not None and high is not None else (
            f">= {low:g}" if low is not None else f"<= {high:g}")
        raise ValueError(f"{name}: expected a number {bound}, got {number}")
    return number


def one_of(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def shared_keys(k: Any, shared_qk: bool) -> None:
    """With shared QK the keys are the queries: ``k`` must be None (and must be given otherwise)."""
    if shared_qk and k is not None:
        got = "a tensor" if _noun(k) == "tensor" else "an array"
        raise ValueError(f"k: expected None with shared_qk=True (the keys are the queries), got {got}")
    if not shared_qk and k is None:
        raise ValueError("k: expected a (B, H, L, D) array with shared_qk=False, got None")


# ---------------------------------------------------------------------------------------- overflow


def _magnitude(operands: dict[str, Any]) -> str:
    """The largest product |x1|·|x2|·... of the operands' entries, written even beyond float64's range."""
    log10 = 0.0
    for x in operands.values():
        peak = float(abs(x).max()) if _size(x) else 0.0
        if peak == 0.0:
            return "0"
        log10 += math.log10(peak)
    exponent = math.floor(log10)
    return f"{10 ** (log10 - exponent):.1f}e{exponent:+03d}"


def check_overflow(result: Any, where: str, *, allow_neg_inf: bool = False, **operands: Any) -> None:
    """``ValueError`` if ``result``, computed in ``where`` from the finite ``operands``, holds NaN or
    ±Inf (with ``allow_neg_inf``: NaN or +Inf; -inf then means "no valid pair"). ``result`` may be a
    tuple of arrays (gradients), each checked, None entries skipped.

    The inputs were checked finite, so a non-finite result is an overflow of the compute dtype. The
    message names the operands, as the caller's user passed them (None operands, optional arguments
    not given, are left out), and how large their product gets::

        q and k overflow float64 in the cross: |q|·|k| up to 1.0e+310

    Cost: one reduction over ``result`` and one read of it (a host synchronisation on a device); the
    operands are read only to word the error. Backends call it once per result they return, after
    any loop, with their own compute dtype (float32 for float16 and bfloat16 inputs).
    """
    if isinstance(result, tuple):
        for part in result:
            if part is not None:
                check_overflow(part, where, allow_neg_inf=allow_neg_inf, **operands)
        return
    if not values_readable(result) or _size(result) == 0:
        return
    if allow_neg_inf:
        if float(_detached(result).max()) < math.inf:
            return
    elif math.isfinite(_sum(result)):
        return
    elif bool(array_namespace(result).isfinite(result).all()):
        return  # finite entries whose sum overflows
    operands = {name: x for name, x in operands.items() if x is not None}
    names = list(operands)
    subject = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    verb = "overflows" if len(names) == 1 else "overflow"
    product = "·".join(f"|{name}|" for name in names)
    raise ValueError(f"{subject} {verb} {_dtype_name(result)} in {where}: {product} up to {_magnitude(operands)}")


@dataclass(frozen=True)
class Overflow:
    """The overflow check (:func:`check_overflow`) of one result of a public function: where it is computed,
    from which of the function's arguments. Each step module states its functions' checks once, in its
    ``OVERFLOWS`` table (function name: one rule per result, or one for the whole result), which the
    reference applies and the backends read instead of retyping them."""

    where: str
    operands: tuple[str, ...]
    allow_neg_inf: bool = False


def check_overflows(results: Any, rules: Sequence[Overflow | None], *, check: Callable[..., None] = check_overflow,
                    **arguments: Any) -> None:
    """``check`` (:func:`check_overflow`, or a backend's equivalent of its signature) of each of ``results`` by
    the rule at its position (one rule: ``results`` as a whole; a None rule or result: nothing), each rule's
    operands taken from ``arguments`` by name."""
    for result, rule in zip((results,) if len(rules) == 1 else results, rules, strict=False):
        if rule is not None and result is not None:
            operands = {name: arguments[name] for name in rule.operands}
            check(result, rule.where, allow_neg_inf=rule.allow_neg_inf, **operands)
