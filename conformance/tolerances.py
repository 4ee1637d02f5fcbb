"""The tolerance table of spec/interface.md, the one place the conformance suite reads it from.

A floating output x of a backend passes against the float64 expectation r when, elementwise,
``|x - r| <= rtol * |r| + atol * m(r) + s``, where m(r) is the largest finite |r| of that output (1
when every entry is 0) and s the smallest subnormal number of the dtype: the table is relative to
the magnitude of what is compared, so a gradient of 1e-5 is held to the same standard as one of
order one. Discrete outputs (offsets, members, assignments) must be equal. The outputs computed through
an FFT (FSAT's cross and the cross inputs' gradients) also get the FFT's normwise error bound
(:func:`fft_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """``rtol`` per element; ``atol`` times the output's magnitude m(r) when ``scaled``, else absolute."""

    rtol: float
    atol: float
    scaled: bool = True


# float16 and bfloat16 results are computed in float32 from the rounded inputs and rounded once:
# rtol is that one rounding, the dtype's unit roundoff (2**-8 and 2**-11, rounded up); atol the
# float32 arithmetic before it, relative to the output's magnitude.
FORWARD: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-11),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "bfloat16": Tolerance(rtol=4e-3, atol=1e-4),
    "float16": Tolerance(rtol=5e-4, atol=1e-4),
}

GRADIENT: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-8, atol=1e-10),
    "float32": Tolerance(rtol=1e-3, atol=1e-4),
    "bfloat16": Tolerance(rtol=4e-3, atol=1e-4),
    "float16": Tolerance(rtol=5e-4, atol=1e-4),
}

# The spacing of each dtype's numbers near 0: below its normal range a result cannot be nearer than
# that, whatever its magnitude, so every comparison allows it on top of the table.
SMALLEST_SUBNORMAL: dict[str, float] = {"float64": 2.0**-1074, "float32": 2.0**-149, "bfloat16": 2.0**-133,
                                        "float16": 2.0**-24}

# The dtype each one accumulates in (spec/interface.md): discrete choices are made on values computed
# at that precision, so it is that precision's tolerance their tie-free margin must exceed.
ACCUMULATION: dict[str, str] = {"float64": "float64", "float32": "float32", "bfloat16": "float32", "float16": "float32"}

# Finite differences move a score or a similarity by about 1e-6: no discrete choice may flip under them.
MIN_DECISION_MARGIN = 1e-4


def decision_margin(values: np.ndarray, dtype: str) -> np.ndarray:
    """The gap a discrete choice (top-k, top-W, argmax) needs at ``values`` to count as tie-free in ``dtype``.

    ``values`` must be computed from the inputs as rounded to ``dtype`` (:func:`round_to`): rounding
    can make two different values equal, and then the tie rule, not the margin, decides.
    """
    tolerance = FORWARD[ACCUMULATION[dtype]]
    finite = np.where(np.isfinite(values), np.abs(values), 0.0)
    return np.maximum(4 * (tolerance.atol + tolerance.rtol * finite), MIN_DECISION_MARGIN)


def round_to(values: np.ndarray | None, dtype: str) -> np.ndarray | None:
    """``values`` rounded to the nearest ``dtype`` numbers (ties to even), returned as float64.

    What a backend holds after ``from_numpy(values, dtype)``: float64 to float32 first, then (bfloat16)
    to 8 significant bits, as torch does; beyond the dtype's range, +-inf. None stays None.
    """
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond the dtype's range is +-inf, as a cast gives
        if dtype == "bfloat16":
            bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.astype(np.uint32).view(np.float32).astype(np.float64)
        return values.astype(dtype).astype(np.float64)


# The unit roundoff of each accumulation dtype, which an FFT's error bound is a multiple of.
UNIT_ROUNDOFF: dict[str, float] = {"float64": 2.0**-53, "float32": 2.0**-24}


def fft_bound(length: int, dtype: str, a: np.ndarray, b: np.ndarray, mask: np.ndarray | None,
              dc: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The error an FFT may add to FSAT's cross, or to its inputs' gradients (spec/interface.md, "Outputs
    computed through an FFT"): ``eps * log2(6L) * F`` with eps the accumulation dtype's unit roundoff and
    F, per (batch, head, feature), ``||a|| ||b|| / n_tau`` for the cross c (B, H, 2L - 1, Dc) or, given
    its cotangent ``dc``, ``(||b|| ||g||, ||a|| ||g||)`` for (da, db) with g = dc / n_tau: 2-norms along the
    sequence, padded positions as 0, 1 / n_tau as 0 where n_tau = 0. Arrays that broadcast to the outputs.
    """
    if mask is None:
        counts = (length - np.abs(np.arange(1 - length, length)))[None].astype(np.float64)
    else:  # the autocorrelation of the unpadded positions, symmetric in tau
        counts = np.stack([np.correlate(row, row, mode="full") for row in (~mask).astype(np.float64)])
    inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)[:, None, :, None]

    def norm(x: np.ndarray) -> np.ndarray:
        x = x if mask is None else np.where(mask[:, None, :, None], 0.0, x)
        return np.sqrt((x * x).sum(axis=2, keepdims=True))

    unit = UNIT_ROUNDOFF[ACCUMULATION[dtype]] * np.log2(6 * length)
    if dc is None:
        return unit * norm(a) * norm(b) * inverse
    g = np.sqrt(((dc * inverse) ** 2).sum(axis=2, keepdims=True))  # along the 2L - 1 offsets
    return unit * norm(b) * g, unit * norm(a) * g


# The reference checked against finite differences: central differences with a step of 1e-6 times
# the inputs' magnitude carry a truncation and rounding error near 1e-9 relative, so this comparison
# has its own, wider row.
FINITE_DIFFERENCES = Tolerance(rtol=1e-6, atol=1e-8)


@dataclass(frozen=True)
class Difference:
    """How far ``actual`` is from ``expected``: the largest absolute and relative errors, and the verdict."""

    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""


def magnitude(expected: np.ndarray) -> float:
    """m(r): the largest finite |r|, or 1 when there is none but 0 (nothing to scale by)."""
    finite = np.abs(expected[np.isfinite(expected)])
    largest = float(finite.max(initial=0.0))
    return largest if largest > 0 else 1.0


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance | None,
            floor: float | np.ndarray = 0.0) -> Difference:
    """Compare two arrays; ``tolerance`` None means exact equality (discrete outputs). ``floor`` is an
    absolute allowance added to the bound (the dtype's :data:`SMALLEST_SUBNORMAL`, and an FFT's error
    bound, :func:`fft_bound`, an array that broadcasts to the outputs')."""
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
    atol = tolerance.atol * (magnitude(expected) if tolerance.scaled else 1.0)
    max_abs = float(error.max(initial=0.0))
    max_rel = float((error / np.maximum(scale, np.finfo(np.float64).tiny)).max(initial=0.0))
    ok = bool(np.all(error <= floor + atol + tolerance.rtol * scale))
    return Difference(max_abs, max_rel, ok)
