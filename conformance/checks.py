"""A conformance check, and how it runs against one backend.

A :class:`Check` holds float64 inputs made from a fixed seed, a ``call`` that runs the function
under test on any backend namespace, and an ``oracle`` that computes the expected outputs
independently of the reference (a naive O(L²) definition, or finite differences of one). A backend
other than the reference is compared with the reference run on the same inputs, rounded to the
backend's dtype; the reference itself is compared with the oracle. Either way the expectation is
float64, and the tolerance comes from :mod:`refattn.conformance.tolerances`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refattn.backends import Backend
from refattn.conformance import tolerances
from refattn.conformance.report import Result

REFERENCE = "numpy"

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Check:
    """One function on one case in one dtype.

    ``call(namespace, inputs)`` returns the function's outputs (an array, a tuple of arrays, or a
    named tuple; None entries are outputs that do not exist in this configuration).
    ``oracle(inputs)`` returns the expected outputs in the same structure from float64 inputs.
    ``discrete`` names the output positions compared exactly. ``gradient`` selects the gradient row
    of the tolerance table; ``oracle_kind`` words what the oracle is for the report.
    """

    algorithm: str
    function: str
    case: str
    dtype: str
    inputs: Inputs
    call: Callable[[Any, Inputs], Any]
    oracle: Callable[[Inputs], Any]
    oracle_kind: str
    gradient: bool = False
    discrete: frozenset[int] = field(default_factory=frozenset)


def seed_for(*parts: object) -> int:
    """A fixed seed for a case, stable across runs and machines."""
    return zlib.crc32(" ".join(map(str, parts)).encode())


def padding(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """A key_padding_mask for the cases: row 0 has a padded tail, the other rows scattered padding.

    No row is wholly padded, so every row keeps queries that produce output; L = 1 has no padding.
    """
    mask = np.zeros((batch, length), dtype=bool)
    if length > 1:
        mask[0, length - max(1, length // 3):] = True
        mask[1:, rng.permutation(length)[: length // 3]] = True
    return mask


def _outputs(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,)


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def run(check: Check, backend: Backend, reference: Backend) -> Result:
    """Run ``check`` on ``backend`` and compare with its expectation; exceptions become failures."""
    row = dict(backend=backend.name, algorithm=check.algorithm, function=check.function, case=check.case,
               dtype=check.dtype)
    is_reference = backend.name == REFERENCE
    against = check.oracle_kind if is_reference else "reference (float64)"
    if check.dtype not in backend.capabilities.dtypes:
        return Result(**row, against=against, status="skip", detail=f"{backend.name} does not support {check.dtype}")
    if check.gradient and not backend.capabilities.gradients:
        return Result(**row, against=against, status="skip", detail=f"{backend.name} provides no gradients")
    device = backend.capabilities.devices[0]
    try:
        converted = {
            name: backend.from_numpy(value, check.dtype if _is_float(value) else None, device)
            if isinstance(value, np.ndarray) else value
            for name, value in check.inputs.items()
        }
        # The expectation is computed from the inputs as the backend holds them (rounded to its dtype).
        rounded = {
            name: np.asarray(backend.to_numpy(converted[name]), dtype=np.float64) if _is_float(value) else value
            for name, value in check.inputs.items()
        }
        actual = _outputs(check.call(getattr(backend, check.algorithm), converted))
        expected = _outputs(check.oracle(rounded) if is_reference
                            else check.call(getattr(reference, check.algorithm), rounded))
    except Exception as error:  # a backend that raises fails the check, and the run goes on
        return Result(**row, against=against, status="fail", detail=f"{type(error).__name__}: {error}")
    if len(actual) != len(expected):
        return Result(**row, against=against, status="fail",
                      detail=f"{len(actual)} outputs, expected {len(expected)}")
    if is_reference:
        tolerance = tolerances.FINITE_DIFFERENCES if check.gradient else tolerances.FORWARD["float64"]
    else:
        tolerance = (tolerances.GRADIENT if check.gradient else tolerances.FORWARD)[check.dtype]
    worst_abs = worst_rel = 0.0
    problems = []
    for position, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got is None or want is None:
            if (got is None) != (want is None):
                problems.append(f"output {position}: {'None' if got is None else 'an array'}, expected "
                                f"{'None' if want is None else 'an array'}")
            continue
        got = backend.to_numpy(got) if not isinstance(got, (np.ndarray, float, int)) else np.asarray(got)
        exact = position in check.discrete
        difference = tolerances.compare(np.asarray(got), np.asarray(want), None if exact else tolerance)
        if not exact:
            worst_abs, worst_rel = max(worst_abs, difference.max_abs), max(worst_rel, difference.max_rel)
        if not difference.ok:
            problems.append(f"output {position}: {difference.detail or 'outside tolerance'}")
    return Result(**row, against=against, status="fail" if problems else "pass", max_abs=worst_abs,
                  max_rel=worst_rel, detail="; ".join(problems))
