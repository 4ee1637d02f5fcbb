"""The tolerance table of spec/interface.md, the one place the conformance suite reads it from.

A floating output x of a backend passes against the float64 expectation r when, elementwise,
``|x - r| <= atol + rtol * |r|``. Discrete outputs (offsets, members, assignments) must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


FORWARD: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-11),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "bfloat16": Tolerance(rtol=4e-2, atol=2e-2),
    "float16": Tolerance(rtol=5e-3, atol=2e-3),
}

GRADIENT: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-8, atol=1e-10),
    "float32": Tolerance(rtol=1e-3, atol=1e-4),
    "bfloat16": Tolerance(rtol=8e-2, atol=4e-2),
    "float16": Tolerance(rtol=2e-2, atol=5e-3),
}

# The dtype each one accumulates in (spec/interface.md): discrete choices are made on values computed
# at that precision, so it is that precision's tolerance their tie-free margin must exceed.
ACCUMULATION: dict[str, str] = {"float64": "float64", "float32": "float32", "bfloat16": "float32", "float16": "float32"}

# Finite differences move a score or a similarity by about 1e-6: no discrete choice may flip under them.
MIN_DECISION_MARGIN = 1e-4


def decision_margin(values: np.ndarray, dtype: str) -> np.ndarray:
    """The gap a discrete choice (top-k, top-W, argmax) needs at ``values`` to count as tie-free in ``dtype``."""
    tolerance = FORWARD[ACCUMULATION[dtype]]
    finite = np.where(np.isfinite(values), np.abs(values), 0.0)
    return np.maximum(4 * (tolerance.atol + tolerance.rtol * finite), MIN_DECISION_MARGIN)


# The reference checked against finite differences: central differences with step 1e-6 carry a
# truncation and rounding error near 1e-9 relative, so this comparison has its own, wider row.
FINITE_DIFFERENCES = Tolerance(rtol=1e-6, atol=1e-8)


@dataclass(frozen=True)
class Difference:
    """How far ``actual`` is from ``expected``: the largest absolute and relative errors, and the verdict."""

    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance | None) -> Difference:
    """Compare two arrays; ``tolerance`` None means exact equality (discrete outputs)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return Difference(np.inf, np.inf, False, f"shape {actual.shape} != expected {expected.shape}")
    if tolerance is None:
        mismatches = int(np.count_nonzero(actual != expected))
        return Difference(float(mismatches > 0), float(mismatches > 0), mismatches == 0,
                          f"{mismatches} of {actual.size} entries differ" if mismatches else "")
    actual = actual.astype(np.float64)
    expected = expected.astype(np.float64)
    both_infinite = np.isinf(actual) & np.isinf(expected) & (np.sign(actual) == np.sign(expected))
    with np.errstate(invalid="ignore"):  # inf - inf where both are infinite, replaced just below
        error = np.where(both_infinite, 0.0, np.abs(actual - expected))
    error = np.where(np.isnan(error), np.inf, error)
    scale = np.where(np.isfinite(expected), np.abs(expected), 0.0)
    max_abs = float(error.max(initial=0.0))
    max_rel = float((error / np.maximum(scale, np.finfo(np.float64).tiny)).max(initial=0.0))
    ok = bool(np.all(error <= tolerance.atol + tolerance.rtol * scale))
    return Difference(max_abs, max_rel, ok)
