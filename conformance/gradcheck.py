"""Central finite differences: a generic numerical vector-Jacobian product for gradient tests.

:func:`numerical_vjp` estimates every element of the gradient (two calls per input element: small
shapes); :func:`directional_vjp` estimates one projection of it, for shapes where that is too slow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Projection", "directional_vjp", "numerical_vjp"]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _projector(f, cotangent):
    cotangents = _as_tuple(cotangent)

    def project(*args: np.ndarray) -> float:
        outputs = _as_tuple(f(*args))
        if len(outputs) != len(cotangents):
            raise ValueError(f"cotangent: f returned {len(outputs)} outputs, got {len(cotangents)} cotangents")
        total = 0.0
        for out, cot in zip(outputs, cotangents, strict=True):
            if cot is None:
                continue
            out = np.asarray(out, dtype=np.float64)
            cot = np.asarray(cot, dtype=np.float64)
            term = np.where(cot == 0, 0.0, cot * np.where(np.isfinite(out), out, 0.0))
            if np.any(~np.isfinite(out) & (cot != 0)):
                raise ValueError("cotangent: nonzero cotangent on a non-finite output")
            total += float(term.sum())
        return total

    return project


def numerical_vjp(
    f: Callable[..., np.ndarray | tuple[np.ndarray, ...]],
    inputs: Sequence[np.ndarray],
    cotangent: np.ndarray | Sequence[np.ndarray | None],
    eps: float = 1e-6,
) -> tuple[np.ndarray, ...]:
    """Estimate the VJP of ``f`` at ``inputs`` by central differences, one input element at a time.

    ``f(*inputs)`` returns one array or a tuple of arrays; ``cotangent`` has the same structure
    (an entry may be None to ignore that output). For every element x of every input:

        d<cotangent, f>/dx ~ (<cotangent, f(x + eps)> - <cotangent, f(x - eps)>) / (2 eps)

    Output entries that are -inf at both ends (e.g. a log-sum-exp of an empty row) contribute 0 when
    their cotangent is 0. The inputs are float64 copies; the caller's arrays are not modified.
    Costs 2 * (total input size) calls of ``f``: keep the inputs small.

    Returns one gradient array per input, each of its input's shape, float64.
    """
    arrays = [np.array(x, dtype=np.float64, copy=True) for x in inputs]
    project = _projector(f, cotangent)
    grads = []
    for x in arrays:
        grad = np.zeros_like(x)
        flat, gflat = x.reshape(-1), grad.reshape(-1)
        for e in range(flat.size):
            original = flat[e]
            flat[e] = original + eps
            plus = project(*arrays)
            flat[e] = original - eps
            minus = project(*arrays)
            flat[e] = original
            gflat[e] = (plus - minus) / (2 * eps)
        grads.append(grad)
    return tuple(grads)


@dataclass(frozen=True)
class Projection:
    """A VJP seen along one direction: ``value`` estimates sum_i <grad_i, directions[i]>, the i-th
    gradient being the i-th that is not None."""

    directions: tuple[np.ndarray, ...]
    value: float


def directional_vjp(
    f: Callable[..., np.ndarray | tuple[np.ndarray, ...]],
    inputs: Sequence[np.ndarray],
    cotangent: np.ndarray | Sequence[np.ndarray | None],
    rng: np.random.Generator,
    eps: float = 1e-5,
) -> Projection:
    """The VJP of ``f`` projected on a random unit direction d (over all inputs together), by one
    central difference: sum_i <grad_i, d_i> ~ (<cotangent, f(x + eps d)> - <cotangent, f(x - eps d)>) / (2 eps).

    Two calls of ``f`` whatever the size: a wrong gradient element changes the projection unless it
    happens to be orthogonal to d, which a random d makes improbable. Compare with
    ``sum_i <vjp_i, d_i>``.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in inputs]
    directions = [rng.standard_normal(x.shape) for x in arrays]
    norm = np.sqrt(sum(float((d * d).sum()) for d in directions))
    directions = [d / norm for d in directions]
    project = _projector(f, cotangent)
    plus = project(*(x + eps * d for x, d in zip(arrays, directions, strict=True)))
    minus = project(*(x - eps * d for x, d in zip(arrays, directions, strict=True)))
    return Projection(tuple(directions), (plus - minus) / (2 * eps))
