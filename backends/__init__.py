"""The backend registry: one table of every backend refattn knows, built-in or third-party.

A backend is a :class:`Backend`: a name, the two namespaces ``fsat`` and ``routing`` with the
functions of spec/interface.md, the conversions between NumPy arrays and its own arrays, and its
capabilities. Built-in backends live in the modules of this package and are imported only when
first loaded, so that ``import refattn`` never imports torch, CuPy or Numba. Third-party backends
register an entry point in the group ``refattn.backends`` whose object is a :class:`Backend` or a
callable returning one; reading the entry points imports none of them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np

ENTRY_POINT_GROUP = "refattn.backends"
DEFAULT_BACKEND = "numpy"


class UnknownBackendError(ValueError):
    """A backend name that no built-in or entry point registers."""


class BackendUnavailableError(ImportError):
    """A registered backend whose library cannot be imported on this machine."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports; the conformance suite skips, with this reason, what it does not.

    ``dtypes`` are NumPy-style names (``"float64"``, ``"float32"``, ``"bfloat16"``, ``"float16"``);
    ``devices`` the devices it can compute on now (empty when it has none, ``unavailable`` says why);
    ``gradients`` whether it provides the ``*_vjp`` functions; ``algorithms`` which of ``fsat`` and
    ``routing`` it implements.
    """

    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    gradients: bool = True
    unavailable: str | None = None
    algorithms: tuple[str, ...] = ("fsat", "routing")


@dataclass(frozen=True)
class Strategy:
    """One of a backend's alternative code paths, which the conformance suite checks on its own.

    ``name`` says which path (e.g. ``"gathered"``); ``functions`` are the ``"algorithm.function"``
    names of spec/interface.md whose computation it changes (a ``*_vjp`` is listed on its own; the
    autograd of a listed function goes with it); ``force()`` returns a context manager inside which
    the backend takes this path on every device in ``devices`` (None: every device), whatever it would
    choose by itself.
    """

    name: str
    functions: tuple[str, ...]
    force: Callable[[], AbstractContextManager[Any]]
    devices: tuple[str, ...] | None = None


def _identity(array: Any, *args: Any, **kwargs: Any) -> Any:
    return array


def _dtype_name(array: Any) -> str:
    """The dtype name of anything with a NumPy-style ``dtype`` (NumPy, CuPy, Numba arrays) or of a Python scalar."""
    dtype = getattr(array, "dtype", None)
    return np.dtype(np.asarray(array).dtype if dtype is None else dtype).name


def _no_device_work() -> None:
    """The ``synchronize`` of a backend that computes on the host: its results are ready on return."""


@dataclass(frozen=True)
class Backend:
    """A backend: spec/interface.md in code.

    - ``name``: the registry's name (``"numpy"``, ``"torch"``, ...);
    - ``fsat``, ``routing``: the two namespaces, with the functions, signatures and errors of
      spec/interface.md (the reference's modules for ``"numpy"``);
    - ``capabilities``: what it supports here (:class:`Capabilities`);
    - ``from_numpy(array, dtype, device)``: the backend's array from a NumPy array (``dtype`` a name
      from ``capabilities.dtypes``, ``device`` one of ``capabilities.devices``); ``to_numpy(x)``: a
      float64 or int64 NumPy array; ``dtype_of(x)``: the name of a backend array's dtype
      (``"float16"``, ``"bfloat16"``, ``"int64"``, ...; the default reads a NumPy-style ``x.dtype``)
      (the array bridge the conformance suite uses);
    - ``synchronize()``: returns once every computation the backend has started has finished (a
      device's queue drained); a no-op for host backends. Timings call it before reading the clock;
    - ``status``: one line for ``refattn info`` (device or simulator in use);
    - ``extra``: backend-specific facts (e.g. ``{"simulator": True}``), never needed by a caller;
    - ``plans(shape, dtype)``: for backends that launch CUDA kernels, the
      :class:`refattn.backends.launch.FunctionPlan` of every public function that launches kernels, for one
      :class:`refattn.backends.launch.Shape` and dtype name, computed as the calls themselves compute their
      launches (``refattn audit`` checks them); None for backends that launch no kernels;
    - ``autodiff(function, inputs, cotangents)``, for a backend with autograd (its presence declares
      it; the conformance suite then differentiates the forward functions): the gradients of
      ``function(*inputs)`` (backend arrays in, an array or a tuple of arrays out) against
      ``cotangents`` (one per output, None to ignore one), one per input, zeros for an input nothing
      depends on;
    - ``strategies``: its alternative code paths (:class:`Strategy`), each checked by the
      conformance suite on its own (spec/interface.md, "What the conformance suite needs").
    """

    name: str
    fsat: ModuleType | Any
    routing: ModuleType | Any
    capabilities: Capabilities
    from_numpy: Callable[..., Any] = _identity
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    status: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    synchronize: Callable[[], None] = _no_device_work
    plans: Callable[..., Any] | None = None
    dtype_of: Callable[[Any], str] = _dtype_name
    autodiff: Callable[[Callable[..., Any], tuple[Any, ...], tuple[Any, ...]], tuple[Any, ...]] | None = None
    strategies: tuple[Strategy, ...] = ()


@dataclass(frozen=True)
class _Builtin:
    module: str
    requires: tuple[str, ...]
    pip_extra: str | None
    without_device: tuple[str, str] | None = None  # (environment variable, how it lets the backend run without a GPU)


_BUILTINS: dict[str, _Builtin] = {
    "numpy": _Builtin("refattn.backends.numpy", (), None),
    "torch": _Builtin("refattn.backends.torch", ("torch",), "torch"),
    "cupy": _Builtin("refattn.backends.cupy", ("cupy",), "cupy", (
        "REFATTN_CUDA_EMULATION", "without a GPU its CUDA kernels run only as CUDA C emulated on the CPU, for tests "
        "(REFATTN_CUDA_EMULATION=1; README, 'What is verified where')")),
    "numba_cuda": _Builtin("refattn.backends.numba_cuda", ("numba", "numba.cuda"), "numba", (
        "NUMBA_ENABLE_CUDASIM", "set NUMBA_ENABLE_CUDASIM=1 before starting Python to run it in Numba's CUDA "
        "simulator (slow: tiny shapes only)")),
}


class _NoDevice:
    """A namespace of a backend with no device here: its functions raise :class:`BackendUnavailableError`
    with the reason when called (classes and constants pass through), instead of failing deep in the
    backend's library (Numba's CudaSupportError, CuPy's CUDA driver errors)."""

    def __init__(self, namespace: Any, message: str) -> None:
        self._namespace = namespace
        self._message = message

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._namespace, name)
        if not callable(attribute) or isinstance(attribute, type):
            return attribute
        message = self._message

        @functools.wraps(attribute)
        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise BackendUnavailableError(message)

        return unavailable

    def __dir__(self) -> list[str]:
        return dir(self._namespace)


def _without_device(backend: Backend, builtin: _Builtin | None) -> Backend:
    """``backend`` itself when it has a device here, or when the variable that runs it without one is set
    to 1; else the same backend whose functions raise :class:`BackendUnavailableError` with the reason
    (capabilities, bridge and plans stay usable: ``refattn info``, the conformance suite and
    ``refattn audit`` read them)."""
    if backend.capabilities.devices:
        return backend
    if builtin is not None and builtin.without_device is not None:
        if os.environ.get(builtin.without_device[0], "").strip() == "1":
            return backend  # asked to run without a device (e.g. CuPy's kernels as CUDA C emulated on the CPU)
    reason = backend.capabilities.unavailable or "no device"
    message = f"backend {backend.name!r} cannot compute on this machine: {reason}"
    if builtin is not None and builtin.without_device is not None:
        variable, hint = builtin.without_device
        if variable not in reason:
            message += f"; {hint}"
    message += "; 'refattn info' shows what every backend can use here"
    return replace(backend, fsat=_NoDevice(backend.fsat, message), routing=_NoDevice(backend.routing, message))


@functools.cache
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not entry.name.isidentifier() or entry.name in _BUILTINS or entry.name in found:
            warnings.warn(
                f"refattn: ignoring entry point {entry.name!r} = {entry.value!r} in group "
                f"{ENTRY_POINT_GROUP!r}: the name is not an identifier, or is already registered",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        found[entry.name] = entry
    return found


def registered() -> dict[str, str]:
    """Every registered backend name, mapped to where it comes from (built-in or entry point)."""
    names = {name: "built-in" for name in _BUILTINS}
    names.update({name: f"entry point {entry.value}" for name, entry in _entry_points().items()})
    return names


def check_name(name: str, *, source: str = "backend") -> str:
    """Return ``name`` if a backend is registered under it, else raise listing the valid names."""
    if name not in registered():
        raise UnknownBackendError(
            f"{source}: unknown backend {name!r}; available: {', '.join(sorted(registered()))}"
        )
    return name


@functools.cache
def get_backend(name: str) -> Backend:
    """Load (once) and return the backend registered as ``name``.

    Raises :class:`UnknownBackendError` for a name nobody registers (listing the valid ones), and
    :class:`BackendUnavailableError` when the backend's library is missing (naming the pip extra). A
    backend that loads but has no device here (``capabilities.devices`` empty) is returned with
    functions that raise :class:`BackendUnavailableError` with the reason and, for the built-in GPU
    backends, how to run them without a GPU.
    """
    check_name(name)
    builtin = _BUILTINS.get(name)
    if builtin is None:
        loaded = _entry_points()[name].load()
        backend = loaded() if callable(loaded) and not isinstance(loaded, Backend) else loaded
        if not isinstance(backend, Backend):
            raise TypeError(f"entry point {name!r} gave {type(backend).__name__}, expected a refattn Backend")
        return _without_device(backend, None)
    for requirement in builtin.requires:
        try:
            importlib.import_module(requirement)
        except ImportError as error:
            raise BackendUnavailableError(
                f"backend {name!r} needs the Python package {requirement.split('.')[0]!r}, which cannot be "
                f"imported ({error}); install it with: pip install 'refattn[{builtin.pip_extra}]'"
            ) from error
    try:
        module = importlib.import_module(builtin.module)
    except ModuleNotFoundError as error:
        if error.name != builtin.module:
            raise
        raise BackendUnavailableError(
            f"backend {name!r} is registered but not implemented in refattn {_version()} yet"
        ) from error
    return _without_device(module.backend(), builtin)


def _version() -> str:
    try:
        return importlib.metadata.version("refattn")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def availability() -> dict[str, str | None]:
    """For every registered backend, None if it loads here, else the reason it does not."""
    reasons: dict[str, str | None] = {}
    for name in registered():
        try:
            get_backend(name)
            reasons[name] = None
        except (ImportError, TypeError) as error:
            reasons[name] = str(error)
    return reasons
