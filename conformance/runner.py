"""Run the conformance checks against backends and report: ``refattn conformance``.

For each backend: every check of every algorithm in every dtype of the tolerance table, on every
device the backend declares, and a check that calls a function one of its strategies changes once
under each such strategy (forced). A dtype the backend does not declare, a part of the grid not
selected, a backend that does not load, or one with no device here is reported as skipped with the
reason; nothing is dropped silently. The exit status is 1 on any failure.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from refattn import backends
from refattn.backends import Backend, Strategy
from refattn.conformance import checks as checks_module
from refattn.conformance import fsat_cases, report, routing_cases, tolerances
from refattn.conformance.report import Result

ALGORITHMS = {"fsat": fsat_cases, "routing": routing_cases}
DTYPES = tuple(tolerances.FORWARD)
PARTS = checks_module.PARTS


def cases(dtype: str, *, quick: bool = False, algorithms: Iterable[str] = tuple(ALGORITHMS),
          functions: Iterable[str] | None = None, parts: Iterable[str] = PARTS,
          calling: Iterable[str] | None = None) -> Iterator[checks_module.Check]:
    """Every check of the given algorithms (default both) and parts in one dtype; only those of
    ``functions`` (check names) and only those that call one of ``calling`` ("algorithm.function") if given."""
    wanted = None if functions is None else set(functions)
    called = None if calling is None else set(calling)
    parts = set(parts)
    for algorithm in algorithms:
        for check in ALGORITHMS[algorithm].checks(dtype, quick=quick):
            if check.part in parts and (wanted is None or check.function in wanted) and \
                    (called is None or check.calls & called):
                yield check


def strategies_for(backend: Backend, check: checks_module.Check, device: str | None = None) -> list[Strategy | None]:
    """The backend's strategies on ``device`` (None: any) that change a function ``check`` calls, or [None]
    (its own choice)."""
    return [strategy for strategy in backend.strategies if check.calls & set(strategy.functions) and (
        device is None or strategy.devices is None or device in strategy.devices)] or [None]


def _skipped(name: str, reason: str, algorithms: Iterable[str], dtype: str = "*",
             case: str = "all cases") -> list[Result]:
    return [Result(backend=name, algorithm=algorithm, function="*", case=case, dtype=dtype,
                   against="-", status="skip", detail=reason) for algorithm in algorithms]


def check_loaded(backend: Backend, *, quick: bool = False, algorithms: Iterable[str] = tuple(ALGORITHMS),
                 dtypes: Iterable[str] = DTYPES, functions: Iterable[str] | None = None,
                 parts: Iterable[str] = PARTS, calling: Iterable[str] | None = None,
                 stop_at_first_failure: bool = False) -> list[Result]:
    """Every check of the given algorithms, dtypes and parts against a loaded backend, as result rows.

    ``calling`` keeps the checks that call one of these ``algorithm.function`` names;
    ``stop_at_first_failure`` returns as soon as one check fails (the mutation self-test uses both).
    """
    name = backend.name
    algorithms, parts = tuple(algorithms), tuple(parts)
    if not backend.capabilities.devices:
        return _skipped(name, f"no device: {backend.capabilities.unavailable}", algorithms)
    missing = [algorithm for algorithm in algorithms if algorithm not in backend.capabilities.algorithms]
    results = _skipped(name, f"{name} does not implement this algorithm", missing)
    implemented = [algorithm for algorithm in algorithms if algorithm not in missing]
    for part in PARTS:
        if part not in parts:
            results += _skipped(name, "not selected (--part)", implemented, case=f"the {part} part")
    reference = backends.get_backend(checks_module.REFERENCE)
    for device in backend.capabilities.devices:
        for dtype in dtypes:
            if dtype not in backend.capabilities.dtypes:
                results += _skipped(name, f"{name} does not support {dtype}", implemented, dtype)
                continue
            for check in cases(dtype, quick=quick, algorithms=implemented, functions=functions, parts=parts,
                               calling=calling):
                for strategy in strategies_for(backend, check, device):
                    results.append(checks_module.run(check, backend, reference, device=device, strategy=strategy))
                    if stop_at_first_failure and results[-1].status == "fail":
                        return results
    return results


def check_backend(name: str, *, quick: bool = False, algorithms: Iterable[str] = tuple(ALGORITHMS),
                  dtypes: Iterable[str] = DTYPES, functions: Iterable[str] | None = None,
                  parts: Iterable[str] = PARTS) -> list[Result]:
    """Every check of the given algorithms, dtypes and parts against the backend registered as ``name``."""
    try:
        backend = backends.get_backend(name)
    except (ImportError, TypeError) as error:
        return _skipped(name, f"backend not available: {error}", tuple(algorithms))
    return check_loaded(backend, quick=quick, algorithms=algorithms, dtypes=dtypes, functions=functions, parts=parts)


def checked_functions(algorithms: Iterable[str] = tuple(ALGORITHMS)) -> list[str]:
    """The names ``--function`` accepts: the functions the suite has checks for, sorted."""
    return sorted({check.function for check in cases("float64", algorithms=algorithms)})


def check_arguments(names: Iterable[str], algorithms: Iterable[str] | None, functions: Iterable[str] | None) -> None:
    """Raise ValueError (UnknownBackendError) naming the valid choices for an unknown backend or function."""
    for name in names:
        backends.check_name(name, source="--backend")
    if functions is not None:
        known = checked_functions(algorithms or tuple(ALGORITHMS))
        unknown = sorted(set(functions).difference(known))
        if unknown:
            among = f" with --algorithm {', '.join(algorithms)}" if algorithms else ""
            raise ValueError(f"--function: no checks for {', '.join(unknown)}{among}; the checked functions are "
                             f"{', '.join(known)}")


def main(names: Iterable[str] | None = None, *, json_path: str | None = None, quick: bool = False,
         algorithms: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
         functions: Iterable[str] | None = None, parts: Iterable[str] | None = None) -> int:
    """Check the named backends (default: every registered one) and print the report; the exit status."""
    names = list(names or backends.registered())
    check_arguments(names, algorithms, functions)
    started = time.perf_counter()
    results: list[Result] = []
    for name in names:
        print(f"checking backend {name} ...", file=sys.stderr, flush=True)
        results += check_backend(name, quick=quick, algorithms=algorithms or tuple(ALGORITHMS),
                                 dtypes=dtypes or DTYPES, functions=functions, parts=parts or PARTS)
    print(f"conformance of {', '.join(names)} against the reference (refattn.fsat, refattn.routing); "
          f"the reference itself against naive O(L^2) oracles and finite differences")
    for name in names:  # what each ran on: a device, a simulator, CUDA C emulated on the CPU
        try:
            print(f"  {name}: {backends.get_backend(name).status}")
        except (ImportError, TypeError) as error:
            print(f"  {name}: not available ({error})")
    report.print_table(results, sys.stdout)
    print(f"({time.perf_counter() - started:.0f} s)")
    if json_path:
        report.write_json(results, json_path)
    return 1 if any(result.status == "fail" for result in results) else 0
