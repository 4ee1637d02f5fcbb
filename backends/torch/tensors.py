"""What the torch backend checks beyond :mod:`refattn.checks`, and its dtype rules.

:mod:`refattn.checks` validates tensors' dtypes, ranks, shapes and values with the reference's
messages; this module adds what is particular to tensors:

- arguments are ``torch.Tensor`` (``TypeError``): NumPy arrays are converted by
  ``Backend.from_numpy``, never implicitly, and all tensors of one call live on one device
  (``ValueError``): :func:`tensors`;
- q, k and v (and other arrays computed together) share one dtype (``TypeError``): :func:`same_dtype`;
- float16 and bfloat16 are computed in float32: :func:`compute_dtype`;
- the checks' reductions build no autograd graph (:func:`checked`, :func:`check_overflow`);
- a layer's input: :func:`layer_input`.

Overflow checks are the reference's: each function applies its reference step module's
``OVERFLOWS["f"]`` rules (:class:`refattn.checks.Overflow`) by :func:`check_overflows`, imported
from the public module (``from refattn.fsat.cross import OVERFLOWS``), never retyped; a composite
checks the intermediates it computes as the reference's composite does.

Value checks (NaN/Inf, offset ranges, overflow) need the data: :mod:`refattn.checks` skips them for
tensors on the ``meta`` device and while ``torch.compile`` traces. Eager calls always run them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from refattn import checks

__all__ = [
    "OPTIONAL",
    "tensors",
    "same_dtype",
    "compute_dtype",
    "checked",
    "check_overflow",
    "check_overflows",
    "host_copy",
    "vjp",
    "layer_input",
]


OPTIONAL = frozenset({"key_padding_mask", "bias", "noise", "cross_q", "cross_k", "dlse", "k", "k_hat"})
"""The tensor arguments of spec/interface.md that may be None (``k`` with shared QK); the checks
that follow :func:`tensors` say when one of them is required."""


def tensors(**named: Any) -> tuple[Any, ...]:
    """The tensor arguments of one call, returned in the order given: each a ``torch.Tensor`` (or None,
    for the names in :data:`OPTIONAL`), else ``TypeError`` naming it; all on one device, else
    ``ValueError`` listing them."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) and not (x is None and name in OPTIONAL):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    given = {name: x for name, x in named.items() if x is not None}
    if len({x.device for x in given.values()}) > 1:
        listing = ", ".join(f"{name} on {x.device}" for name, x in given.items())
        raise ValueError(f"{', '.join(given)}: expected all tensors on one device, got {listing}")
    return tuple(named.values())


def same_dtype(**named: Any) -> torch.dtype | None:
    """Raise ``TypeError`` unless every tensor among ``named`` (None skipped) has one dtype; return it."""
    given = {name: x for name, x in named.items() if x is not None}
    dtypes = {x.dtype for x in given.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} {x.dtype}" for name, x in given.items())
        raise TypeError(f"{', '.join(given)}: expected one floating-point dtype, got {listing}")
    return next(iter(dtypes)) if dtypes else None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 and float32 as they are, float16/bfloat16 (and others) float32;
    of several dtypes (tokens and a layer's wider centroid state), the widest of theirs."""
    widest = dtypes[0] if dtypes[0] in (torch.float64, torch.float32) else torch.float32
    for dtype in dtypes[1:]:
        widest = torch.promote_types(widest, compute_dtype(dtype))
    return widest


def checked(check: Callable[..., Any]) -> Callable[..., Any]:
    """A check run under ``torch.no_grad``: its reductions over tensors that require grad build no
    autograd graph (nor warn when read back)."""
    return torch.no_grad()(check)


check_overflow = checked(checks.check_overflow)


def check_overflows(results: Any, rules: Sequence[checks.Overflow | None], **arguments: Any) -> None:
    """The reference's overflow rules of a function (``OVERFLOWS[name]`` of its step module) applied to
    tensor ``results`` by :func:`check_overflow`: :func:`refattn.checks.check_overflows`, same messages."""
    checks.check_overflows(results, rules, check=check_overflow, **arguments)


def host_copy(x: torch.Tensor) -> Any:
    """A NumPy view (CPU) or copy (other devices) of an integer tensor, for :mod:`refattn.checks`'
    value checks that run on NumPy arrays only (offsets, members): one transfer, no cast."""
    return x.detach().cpu().numpy()


def vjp(function: Callable[..., Any], inputs: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """The gradients of ``function(*inputs)`` (a tensor or a tuple of tensors) against ``cotangents``
    (one per output, None to ignore it) by ``torch.autograd``: one per input, zeros for an input
    nothing depends on. A cotangent is cast to its output's dtype."""
    leaves = tuple(x.detach().requires_grad_() for x in inputs)
    with torch.enable_grad():
        outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if len(outputs) != len(cotangents):
        raise ValueError(f"cotangents: {len(cotangents)} given for {len(outputs)} outputs")
    pairs = [(out, cot.to(out.dtype)) for out, cot in zip(outputs, cotangents, strict=True)
             if cot is not None and out.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad([out for out, _ in pairs], leaves, [cot for _, cot in pairs], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True))


@checked
def layer_input(x: Any, width: int, parameters: torch.dtype) -> torch.Tensor:
    """Validate a layer's input ``x`` (B, L, width): a finite floating tensor, every axis non-empty, of
    the layer's parameter dtype (any floating dtype under ``torch.autocast``, which casts it).

    A float64 ``x`` given to a float32 layer raises ``TypeError`` naming both dtypes rather than being
    cast: a silent cast would lose precision the caller asked for (torch's ``nn.Linear`` raises too,
    deep inside its matmul).
    """
    (x,) = tensors(x=x)
    checks.float_array(x, "x", rank=3, axes="(B, L, dim)")
    checks.expect_shape(x, "x", (None, None, width), "(B, L, dim)")
    if 0 in x.shape:
        raise ValueError(f"x: expected every axis of (B, L, dim) to be at least 1, got shape {tuple(x.shape)}")
    if x.dtype != parameters and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x: expected a tensor of the layer's dtype {parameters}, got {x.dtype} "
            f"(convert the input with x.to({parameters}) or the layer with layer.to({x.dtype}))"
        )
    return x
