"""The PyTorch backend: the interface of spec/interface.md on CPU and CUDA tensors, with autograd.

The reference's layout: :mod:`.fsat` and :mod:`.routing` hold one module per step of
:mod:`refattn.fsat` and :mod:`refattn.routing`, with the same names; :mod:`.tensors` what the
backend checks beyond :mod:`refattn.checks`; :mod:`.layers` the ``nn.Module`` layers for training,
:class:`FSATAttention` and :class:`RoutingAttention`.

``get_backend("torch").fsat.attention`` and ``.routing.attention`` are differentiable with
``torch.autograd``; the ``*_vjp`` functions give the same gradients explicitly. Inputs must be
tensors on one device; outputs are tensors of the inputs' dtype (float16 and bfloat16 inputs are
accumulated in float32 in the softmax, the reductions and the FFT).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from refattn.backends import Backend, Capabilities, Strategy
from refattn.backends.torch import fsat, kernels, routing
from refattn.backends.torch.fsat.sparse_attention import forced_path
from refattn.backends.torch.layers import FSATAttention, RoutingAttention
from refattn.backends.torch.tensors import vjp

__all__ = ["FSATAttention", "RoutingAttention", "backend", "fsat", "routing"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_numpy(array: np.ndarray, dtype: str | None = None, device: str = "cpu") -> torch.Tensor:
    tensor = torch.from_numpy(np.require(array, requirements="C"))  # ascontiguousarray would make 0-d arrays 1-d
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(_DTYPES[dtype])
    return tensor.to(device)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.double() if tensor.is_floating_point() else tensor.long()).numpy()


def _synchronize() -> None:
    """Wait for every CUDA device's queue; tensors on the CPU are computed when a call returns."""
    if torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _dtype_of(tensor: Any) -> str:
    if isinstance(tensor, torch.Tensor):
        return str(tensor.dtype).removeprefix("torch.")
    return np.asarray(tensor).dtype.name


# The FSAT sparse attention runs fused on a CPU (C++ kernels), by slices where they cannot be built and by a
# row gather on a GPU (fsat/sparse_attention.py); the shift paths are checked on whatever device is present,
# the fused one on the CPU, the sliced one with every CPU kernel off (a machine without g++).
_SPARSE = ("fsat.sparse_attention", "fsat.sparse_attention_vjp", "fsat.attention", "fsat.attention_vjp")
# The other CPU kernels (kernels/): FSAT's FFT operands, routing's selection and scatter; checked on and off.
_KERNELS = ("fsat.cross", *(f"routing.{name}" for name in (
    "route", "cluster_attention", "cluster_attention_vjp", "combine", "combine_vjp", "attention", "attention_vjp",
    "update_centroids")))


@contextlib.contextmanager
def _sliced_without_kernels() -> Iterator[None]:
    with forced_path("sliced"), kernels.forced(False):
        yield


STRATEGIES = (Strategy("fused", _SPARSE, functools.partial(forced_path, "fused"), devices=("cpu",)),
              Strategy("sliced", _SPARSE, _sliced_without_kernels),
              Strategy("gathered", _SPARSE, functools.partial(forced_path, "gathered")),
              Strategy("cpu-kernels", _KERNELS, functools.partial(kernels.forced, True), devices=("cpu",)),
              Strategy("torch-ops", _KERNELS, functools.partial(kernels.forced, False)))


def backend() -> Backend:
    """The PyTorch backend on the CPU, and on CUDA when a device is visible."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    where = f"CUDA device {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only (no CUDA device)"
    return Backend(
        name="torch",
        fsat=fsat,
        routing=routing,
        capabilities=Capabilities(dtypes=tuple(_DTYPES), devices=devices, gradients=True),
        from_numpy=_from_numpy,
        to_numpy=_to_numpy,
        status=f"PyTorch {torch.__version__}, {where}",
        synchronize=_synchronize,
        dtype_of=_dtype_of,
        autodiff=vjp,
        strategies=STRATEGIES,
    )
