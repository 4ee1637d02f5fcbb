"""The conformance suite itself: it passes the reference, fails a broken backend, and reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import refattn
from refattn.backends import Backend, Capabilities
from refattn.conformance import checks, fsat_cases, runner, tolerances

REPO = Path(__file__).resolve().parents[1]


def test_reference_passes_against_its_oracles_and_the_report_is_written(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "refattn", "conformance", "--backend", "numpy", "--quick",
                             "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(report.read_text())
    statuses = {row["status"] for row in rows}
    assert statuses == {"pass", "skip"}
    functions = {(row["algorithm"], row["function"]) for row in rows if row["status"] == "pass"}
    for name in ("pair_counts", "cross", "cross_vjp", "estimate", "estimate_vjp", "select", "sparse_attention",
                 "sparse_attention_vjp", "attention", "attention_vjp"):
        assert ("fsat", name) in functions
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped$", result.stdout, re.MULTILINE)


def test_function_filter_runs_only_those_checks_and_rejects_unknown_names(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "refattn", "conformance", "--backend", "numpy", "--quick", "--dtype", "float64"]
    result = subprocess.run(command + ["--function", "route", "--function", "cross", "--json", str(report)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = {row["function"] for row in json.loads(report.read_text()) if row["status"] == "pass"}
    assert ran == {"route", "cross"}
    result = subprocess.run(command + ["--function", "cros"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "--function: no checks for cros; the checked functions are" in result.stderr and "cross," in result.stderr
    result = subprocess.run(command[:4] + ["--backend", "nope"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "unknown backend 'nope'; available:" in result.stderr


def _perturbed(namespace, name: str, factor: float):
    def wrong(*args, **kwargs):
        out = getattr(namespace, name)(*args, **kwargs)
        return tuple(x * factor for x in out) if isinstance(out, tuple) else out * factor
    members = {member: getattr(namespace, member) for member in namespace.__all__}
    return SimpleNamespace(**dict(members, **{name: wrong}))


def test_a_backend_off_by_one_part_in_ten_million_fails() -> None:
    reference = refattn.get_backend("numpy")
    broken = Backend(name="broken", fsat=_perturbed(refattn.fsat, "cross", 1 + 1e-7), routing=refattn.routing,
                     capabilities=Capabilities(dtypes=("float64",), devices=("cpu",)))
    results = {}
    for check in fsat_cases.checks("float64", quick=True):
        if check.function in ("cross", "sparse_attention"):
            results.setdefault(check.function, []).append(checks.run(check, broken, reference).status)
    assert set(results["cross"]) == {"fail"}
    assert set(results["sparse_attention"]) == {"pass"}


def test_a_backend_with_the_wrong_tie_break_fails_select() -> None:
    reference = refattn.get_backend("numpy")

    def select_largest_offset_first(s, top_k, *, causal=False, noise=None):
        flipped = refattn.fsat.select(s[..., ::-1].copy(), top_k, causal=False, noise=None if noise is None
                                      else noise[..., ::-1].copy())
        return np.sort(-flipped, axis=-1)

    namespace = SimpleNamespace(**{name: getattr(refattn.fsat, name) for name in refattn.fsat.__all__})
    namespace.select = select_largest_offset_first
    broken = Backend(name="broken", fsat=namespace, routing=refattn.routing,
                     capabilities=Capabilities(dtypes=("float64",), devices=("cpu",)))
    tie = np.zeros((1, 1, 5))  # L = 3, every offset scores the same: the tie rule decides
    check = checks.Check("fsat", "select", "all tied", "float64", {"s": tie}, discrete=frozenset({0}),
                         call=lambda ns, x: ns.select(x["s"], 2), oracle=lambda x: np.array([[[-1, 0]]]),
                         oracle_kind="hand")
    assert checks.run(check, refattn.get_backend("numpy"), reference).status == "pass"
    assert checks.run(check, broken, reference).status == "fail"


def test_a_backend_without_gradients_has_its_vjp_checks_skipped_with_the_reason() -> None:
    reference = refattn.get_backend("numpy")
    forward_only = Backend(name="forward_only", fsat=refattn.fsat, routing=refattn.routing,
                           capabilities=Capabilities(dtypes=("float64",), devices=("cpu",), gradients=False))
    results = [checks.run(check, forward_only, reference) for check in fsat_cases.checks("float64", quick=True)
               if check.function in ("cross", "cross_vjp")]
    assert {(row.function, row.status) for row in results} == {("cross", "pass"), ("cross_vjp", "skip")}
    assert {row.detail for row in results if row.status == "skip"} == {"forward_only provides no gradients"}


def test_unsupported_dtypes_are_reported_as_skipped_with_the_reason() -> None:
    rows = runner.check_backend("numpy", quick=True)
    skipped = [row for row in rows if row.status == "skip"]
    assert {row.dtype for row in skipped} == {"float32", "bfloat16", "float16"}
    assert all(row.detail == f"numpy does not support {row.dtype}" for row in skipped)


def test_tolerance_table_is_the_one_in_the_spec() -> None:
    text = (REPO / "spec" / "interface.md").read_text()
    for dtype in tolerances.FORWARD:
        row = re.search(rf"^\| {dtype} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", text, re.MULTILINE)
        assert row, f"no {dtype} row in spec/interface.md"
        forward_rtol, forward_atol, gradient_rtol, gradient_atol = (float(cell) for cell in row.groups())
        assert tolerances.FORWARD[dtype] == tolerances.Tolerance(forward_rtol, forward_atol)
        assert tolerances.GRADIENT[dtype] == tolerances.Tolerance(gradient_rtol, gradient_atol)


def test_compare_handles_matching_infinities_and_flags_mismatches() -> None:
    tolerance = tolerances.FORWARD["float64"]
    assert tolerances.compare(np.array([-np.inf, 1.0]), np.array([-np.inf, 1.0]), tolerance).ok
    assert not tolerances.compare(np.array([0.0, 1.0]), np.array([-np.inf, 1.0]), tolerance).ok
    assert not tolerances.compare(np.array([np.nan]), np.array([1.0]), tolerance).ok
    assert not tolerances.compare(np.zeros(3), np.zeros(4), tolerance).ok
    assert not tolerances.compare(np.array([1, 2]), np.array([2, 1]), None).ok


def test_pytest_entry_runs_the_suite_against_a_chosen_backend(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "refattn.conformance", "-q",
                             "--refattn-quick", "--refattn-backend", "numpy", "-p", "no:cacheprovider",
                             "-k", "fsat.cross and float64"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\d+ passed", result.stdout)


def test_torch_backend_passes_the_whole_suite_in_every_dtype(tmp_path: Path) -> None:
    """``refattn conformance --backend torch``: the full grid, float64, float32, bfloat16 and float16, on CPU."""
    pytest.importorskip("torch")
    report = tmp_path / "torch.json"
    command = [sys.executable, "-m", "refattn", "conformance", "--backend", "torch", "--json", str(report)]
    result = subprocess.run(command,
                            capture_output=True, text=True, timeout=1200)
    rows = json.loads(report.read_text())
    failures = [row for row in rows if row["status"] != "pass"]
    assert result.returncode == 0 and not failures, failures[:5]
    assert {row["dtype"] for row in rows} == set(tolerances.FORWARD)
    assert {row["algorithm"] for row in rows} == {"fsat", "routing"}
