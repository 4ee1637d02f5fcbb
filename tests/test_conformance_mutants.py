"""The conformance suite's mutation self-test: every mutant backend of conformance_mutants.py fails the
suite, and the same wrappers with nothing changed pass it.

Each mutant runs only the checks that call the functions it replaces (the quick grid, or for a bug
that needs L > 32 the full grid's large part; every dtype, device and strategy it declares) and
stops at its first failing check.
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")

import conformance_mutants as mutants  # noqa: E402

from refattn.conformance import runner  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (on a loaded two-core machine
    each torch FFT then costs about 15 ms instead of 10 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _algorithms(replaces: tuple[str, ...]) -> list[str]:
    return sorted({name.split(".")[0] for name in replaces})


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=[mutant.name for mutant in mutants.MUTANTS])
def test_the_suite_fails_the_mutant(mutant: mutants.Mutant) -> None:
    rows = runner.check_loaded(mutant.build(), quick=not mutant.large, algorithms=_algorithms(mutant.replaces),
                               parts=("large",) if mutant.large else runner.PARTS, calling=mutant.replaces,
                               stop_at_first_failure=True)
    failed = [row for row in rows if row.status == "fail"]
    assert failed, f"{mutant.name} ({mutant.description}) passed {len(rows)} checks"


def test_the_unmutated_torch_wrapper_passes_the_quick_grid() -> None:
    backend = mutants.unmutated()[0]
    rows = runner.check_loaded(backend, quick=True)
    assert Counter(row.status for row in rows) == {"pass": len(rows)}, [row for row in rows if row.status != "pass"][:3]
    assert {row.strategy for row in rows if row.function == "sparse_attention"} == {"fused", "sliced", "gathered"}


def test_the_unmutated_two_device_wrapper_passes_on_both_devices() -> None:
    backend = mutants.unmutated()[1]
    rows = runner.check_loaded(backend, quick=True, calling=("fsat.cross",))
    passed = [row for row in rows if row.status == "pass"]
    assert {row.device for row in passed} == {"cpu", "cpu:1"}
    assert {row.detail for row in rows if row.status != "pass" and row.function != "*"} == {
        "numpy_two_devices declares no autograd (no autodiff hook)"}


def test_every_gap_of_issue_16_has_mutants_and_there_are_at_least_twenty() -> None:
    gaps = Counter(mutant.gap for mutant in mutants.MUTANTS)
    assert set(gaps) == {"ties", "autograd", "strategies", "dtypes", "extreme", "shapes", "tolerances", "classic"}
    assert len(mutants.MUTANTS) >= 20
    assert {mutant.replaces[0].split(".")[0] for mutant in mutants.MUTANTS} == {"fsat", "routing"}
