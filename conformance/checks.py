"""A conformance check, and how it runs against one backend.

A :class:`Check` holds float64 inputs made from a fixed seed, a ``call`` that runs the function
under test on any backend namespace, and an ``oracle`` that computes the expected outputs
independently of the reference (a naive O(L²) definition, or finite differences of one). A backend
other than the reference is compared with the reference run on the same inputs, rounded to the
backend's dtype; the reference itself is compared with the oracle. Either way the expectation is
float64, and the tolerance comes from :mod:`refattn.conformance.tolerances`. Every output's dtype
and shape are checked too: floating outputs in the inputs' dtype, discrete ones int64.

An autograd check (``autodiff`` set) differentiates ``call`` itself, the forward, through the
backend's ``autodiff`` hook, and compares with the reference's ``*_vjp``.

An error check (``error`` set) gives inputs the function must reject (values whose results overflow
the dtype): the backend must raise the ValueError the reference raises, message for message.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refattn.backends import Backend, Strategy
from refattn.checks import check_overflows
from refattn.conformance import tolerances
from refattn.conformance.gradcheck import Projection
from refattn.conformance.report import Result

REFERENCE = "numpy"

# The parts of the grid: the ordinary cases; deliberate ties of the discrete choices; values near
# the limits of the softmax and of the dtypes; and shapes large enough for half-precision
# accumulation errors to show (which a slow emulator may leave out, saying so).
PARTS = ("base", "ties", "extreme", "large")

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Autodiff:
    """What an autograd check differentiates: ``call`` in the inputs named ``wrt``, against the
    cotangents named ``cotangents`` (one per output of ``call``, None to ignore an output); the
    expectation is ``reference(namespace, inputs)``, the reference's VJP, one gradient per ``wrt``."""

    wrt: tuple[str, ...]
    cotangents: tuple[str | None, ...]
    reference: Callable[[Any, Inputs], Any]


@dataclass(frozen=True)
class Check:
    """One function on one case in one dtype.

    ``call(namespace, inputs)`` returns the function's outputs (an array, a tuple of arrays, or a
    named tuple; None entries are outputs that do not exist in this configuration).
    ``oracle(inputs)`` returns the expected outputs in the same structure from float64 inputs (None for
    an autograd check: the reference has no autograd, and its VJPs have their own checks).
    ``discrete`` names the output positions compared exactly (int64); ``accumulated`` the floating
    ones a backend may return in its accumulation dtype instead of the inputs', or as a Python float
    (a scalar loss).
    ``gradient`` selects the gradient row of the tolerance table; ``oracle_kind`` words what the
    oracle is for the report; ``part`` is one of :data:`PARTS`; ``autodiff`` makes it an autograd check.
    ``fft(inputs)``, for outputs computed through an FFT, gives per output the FFT's error bound
    (:func:`~refattn.conformance.tolerances.fft_bound`, None for the others), added to the table's.
    ``error`` makes it an error check: ``call`` must raise ValueError with the reference's message
    (:func:`error_of` of each), and ``oracle(inputs)`` returns the message the reference itself must raise.
    """

    algorithm: str
    function: str
    case: str
    dtype: str
    inputs: Inputs
    call: Callable[[Any, Inputs], Any]
    oracle: Callable[[Inputs], Any] | None = None
    oracle_kind: str = "-"
    gradient: bool = False
    discrete: frozenset[int] = field(default_factory=frozenset)
    accumulated: frozenset[int] = field(default_factory=frozenset)
    part: str = "base"
    autodiff: Autodiff | None = None
    fft: Callable[[Inputs], tuple[Any, ...]] | None = None
    error: bool = False

    @property
    def calls(self) -> frozenset[str]:
        """The ``algorithm.function`` names of the interface this check calls (what a strategy may change)."""
        names = re.split(r"[+:]", self.function)
        return frozenset(f"{self.algorithm}.{name}" for name in names if name != "autodiff")


def seed_for(*parts: object) -> int:
    """A fixed seed for a case, stable across runs and machines."""
    return zlib.crc32(" ".join(map(str, parts)).encode())


def flag_grid(names: Sequence[str], *, quick: bool) -> list[dict[str, bool]]:
    """Every combination of the boolean flags ``names``; or, ``quick`` with three flags or more, a
    pairwise covering: all off, then each one off with the others on (every two flags meet in all
    four combinations), n + 1 rows instead of 2**n."""
    count = len(names)
    if quick and count >= 3:
        rows = [(False,) * count] + [tuple(other != one for other in range(count)) for one in range(count)]
    else:
        rows = list(itertools.product((False, True), repeat=count))
    return [dict(zip(names, row, strict=True)) for row in rows]


def padding(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """A key_padding_mask for the cases: row 0 has a padded tail, the other rows scattered padding.

    No row is wholly padded, so every row keeps queries that produce output; L = 1 has no padding.
    """
    mask = np.zeros((batch, length), dtype=bool)
    if length > 1:
        mask[0, length - max(1, length // 3):] = True
        mask[1:, rng.permutation(length)[: length // 3]] = True
    return mask


HUGE = 1e160  # a product of two is 1e320, beyond float64; each alone is finite


def overflowing(kind: str, rng: np.random.Generator, shape: tuple[int, int, int, int], row: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) of ``shape`` (B, H, L, D) whose logits of query ``row`` overflow float64 (in every batch and
    head), the other queries' logits about 1e-10 (q about 1e-170, the keys of order one or HUGE):

    - ``"nan"``: q_row = HUGE (1, 1, ...) and every key HUGE (1, -1, 1, ...): q_row . k_j = inf - inf;
    - ``"inf"``: q_row = k_row = HUGE (1, 1, ...): its logit with its own key is +inf, the others finite;
    - ``"neg_inf"``: q_row = -HUGE (1, 1, ...): its logit with a key the caller sets to HUGE (1, 1, ...)
      is -inf.
    """
    dim = shape[3]
    q = 1e-170 * rng.standard_normal(shape)
    k = rng.standard_normal(shape)
    ones = np.ones(dim)
    if kind == "nan":
        q[:, :, row] = HUGE * ones
        k[:] = HUGE * np.resize([1.0, -1.0], dim)
    elif kind == "inf":
        q[:, :, row] = k[:, :, row] = HUGE * ones
    elif kind == "neg_inf":
        q[:, :, row] = -HUGE * ones
    else:
        raise ValueError(f"kind: expected 'nan', 'inf' or 'neg_inf', got {kind!r}")
    return q, k


NO_ERROR = "no error"


def error_of(call: Callable[[], Any]) -> str:
    """What ``call()`` raises, as an error check compares it: ``"ValueError: <message>"``, or :data:`NO_ERROR`
    (any other exception propagates: a failure of the check)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow under test warns on its way to the error
            call()
    except ValueError as error:
        return f"ValueError: {error}"
    return NO_ERROR


def overflow_error(results: Callable[[], Any], rules: Sequence[Any], **operands: Any) -> str:
    """The error an oracle's ``results()`` call for (:func:`error_of`): the reference's overflow ``rules`` (a
    step module's ``OVERFLOWS`` entry) applied to them, ``operands`` named as the reference names its
    arguments; a NaN or +inf result from finite inputs (an overflow) gives the reference's ValueError."""
    return error_of(lambda: check_overflows(results(), rules, **operands))


def nan_rows(like: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """An array shaped as ``like`` (B, H, L, F): NaN on the rows where ``rows`` (B, H, L) is True, 0 elsewhere.
    A gradient as far as an overflow decides it: a row of NaN softmax weights makes dz and dq_i NaN."""
    return np.broadcast_to(np.where(rows[..., None], np.nan, 0.0), like.shape)


def _outputs(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,)


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _expected_dtypes(check: Check, position: int, output: Any) -> tuple[str, ...]:
    if position in check.discrete:
        return ("int64",)
    if position in check.accumulated:
        return tuple(dict.fromkeys((check.dtype, tolerances.ACCUMULATION[check.dtype])
                                   + (("float64",) if isinstance(output, float) else ())))
    return (check.dtype,)


def _compute(check: Check, backend: Backend, namespace: Any, inputs: Inputs) -> Any:
    """The backend's outputs: ``call``, or for an autograd check the gradients of ``call`` by its hook."""
    if check.autodiff is None:
        return check.call(namespace, inputs)
    wrt, cotangents = check.autodiff.wrt, check.autodiff.cotangents

    def forward(*arrays: Any) -> Any:
        return check.call(namespace, dict(inputs, **dict(zip(wrt, arrays, strict=True))))

    return backend.autodiff(forward, tuple(inputs[name] for name in wrt),
                            tuple(None if name is None else inputs[name] for name in cotangents))


def run(check: Check, backend: Backend, reference: Backend, *, device: str | None = None,
        strategy: Strategy | None = None) -> Result:
    """Run ``check`` on ``backend`` and compare with its expectation; exceptions become failures.

    ``device`` (default the backend's first) is where the inputs are placed; ``strategy``, one of
    the backend's, is forced around the call.
    """
    device = device if device is not None else (backend.capabilities.devices or ("-",))[0]
    row = dict(backend=backend.name, algorithm=check.algorithm, function=check.function, case=check.case,
               dtype=check.dtype, device=device, strategy=strategy.name if strategy else "-")
    is_reference = backend.name == REFERENCE
    against = check.oracle_kind if is_reference else "reference (float64)"
    if check.dtype not in backend.capabilities.dtypes:
        return Result(**row, against=against, status="skip", detail=f"{backend.name} does not support {check.dtype}")
    if check.gradient and not backend.capabilities.gradients:
        return Result(**row, against=against, status="skip", detail=f"{backend.name} provides no gradients")
    if check.autodiff is not None and backend.autodiff is None:
        return Result(**row, against=against, status="skip",
                      detail=f"{backend.name} declares no autograd (no autodiff hook)")
    if is_reference and check.oracle is None:
        return Result(**row, against=against, status="skip", detail=f"{backend.name} has no oracle for this check")
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
        with strategy.force() if strategy else contextlib.nullcontext():
            if check.error:
                actual = (error_of(lambda: _compute(check, backend, getattr(backend, check.algorithm), converted)),)
            else:
                actual = _outputs(_compute(check, backend, getattr(backend, check.algorithm), converted))
        if is_reference:
            expected = _outputs(check.oracle(rounded))
        else:
            namespace = getattr(reference, check.algorithm)
            if check.error:
                expected = (error_of(lambda: check.call(namespace, rounded)),)
            else:
                expected = _outputs(check.autodiff.reference(namespace, rounded) if check.autodiff
                                    else check.call(namespace, rounded))
    except Exception as error:  # a backend that raises fails the check, and the run goes on
        return Result(**row, against=against, status="fail", detail=f"{type(error).__name__}: {error}")
    if check.error:
        raised, wanted = actual[0], expected[0]
        if wanted == NO_ERROR:
            return Result(**row, against=against, status="fail",
                          detail=f"{'the oracle' if is_reference else 'the reference'} expects no error here")
        return Result(**row, against=against, status="pass" if raised == wanted else "fail",
                      detail="" if raised == wanted else f"raised {raised!r}, expected {wanted!r}")
    if is_reference and len(expected) == 1 and isinstance(expected[0], Projection):
        return _projected(backend, actual, expected[0], row, against)
    if len(actual) != len(expected):
        return Result(**row, against=against, status="fail",
                      detail=f"{len(actual)} outputs, expected {len(expected)}")
    if is_reference:
        tolerance = tolerances.FINITE_DIFFERENCES if check.gradient else tolerances.FORWARD["float64"]
    else:
        tolerance = (tolerances.GRADIENT if check.gradient else tolerances.FORWARD)[check.dtype]
    worst_abs = worst_rel = 0.0
    problems = []
    fft = check.fft(rounded) if check.fft else ()
    for position, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got is None or want is None:
            if (got is None) != (want is None):
                problems.append(f"output {position}: {'None' if got is None else 'an array'}, expected "
                                f"{'None' if want is None else 'an array'}")
            continue
        allowed = _expected_dtypes(check, position, got)
        try:
            dtype = backend.dtype_of(got)
            got = backend.to_numpy(got) if not isinstance(got, (np.ndarray, float, int)) else np.asarray(got)
        except Exception as error:  # not an array of this backend
            problems.append(f"output {position}: {type(error).__name__}: {error}")
            continue
        if dtype not in allowed:
            problems.append(f"output {position}: dtype {dtype}, expected {' or '.join(allowed)}")
        exact = position in check.discrete
        floor = tolerances.SMALLEST_SUBNORMAL[check.dtype]
        if position < len(fft) and fft[position] is not None:
            floor = floor + fft[position]
        difference = tolerances.compare(np.asarray(got), np.asarray(want), None if exact else tolerance, floor=floor)
        if not exact:
            worst_abs, worst_rel = max(worst_abs, difference.max_abs), max(worst_rel, difference.max_rel)
        if not difference.ok:
            problems.append(f"output {position}: {difference.detail or 'outside tolerance'}")
    return Result(**row, against=against, status="fail" if problems else "pass", max_abs=worst_abs,
                  max_rel=worst_rel, detail="; ".join(problems))


def _projected(backend: Backend, actual: tuple[Any, ...], expected: Projection, row: dict[str, str],
               against: str) -> Result:
    """The reference's gradients against a directional finite difference: sum_i <grad_i, d_i>."""
    grads = [np.asarray(backend.to_numpy(g), dtype=np.float64) for g in actual if g is not None]
    if len(grads) != len(expected.directions):
        return Result(**row, against=against, status="fail",
                      detail=f"{len(grads)} gradients, expected {len(expected.directions)}")
    if any(g.shape != d.shape for g, d in zip(grads, expected.directions, strict=True)):
        return Result(**row, against=against, status="fail", detail="gradient shapes differ from the inputs'")
    value = sum(float((g * d).sum()) for g, d in zip(grads, expected.directions, strict=True))
    difference = tolerances.compare(np.asarray(value), np.asarray(expected.value), tolerances.FINITE_DIFFERENCES)
    return Result(**row, against=against, status="pass" if difference.ok else "fail", max_abs=difference.max_abs,
                  max_rel=difference.max_rel, detail="" if difference.ok else "projection outside tolerance")
