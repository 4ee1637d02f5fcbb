"""The conformance suite itself: it passes the reference, fails a broken backend, and reports."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import refattn
from refattn.backends import Backend, Capabilities, Strategy
from refattn.conformance import checks, fsat_cases, gradcheck, report, routing_cases, runner, tolerances
from refattn.fsat.sparse_attention import sparse_attention_core

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


def test_reference_passes_the_large_part_of_the_full_grid() -> None:
    """The quick grid leaves the large shapes out: the reference's are checked here (its gradients along a
    random direction)."""
    rows = runner.check_backend("numpy", parts=("large",), dtypes=("float64",))
    passed = [row for row in rows if row.status == "pass"]
    assert passed and not [row for row in rows if row.status == "fail"]
    assert {row.against for row in passed} == {"naive O(L^2)", "naive loops", "naive sort", "naive argmax",
                                               "naive brute force", "naive formula", "directional finite differences"}
    assert all("L64 D32" in row.case for row in passed)


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
    assert "argument --function: unknown function 'cros'; choose from " in result.stderr
    assert "cross," in result.stderr
    result = subprocess.run(command[:4] + ["--backend", "nope"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "argument --backend: unknown backend 'nope'; choose from numpy, torch" in result.stderr


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


def test_a_backend_that_returns_an_overflow_silently_fails_the_error_checks() -> None:
    """The overflow cases (q . k beyond float64) pass the reference against the naive oracle and fail a
    sparse attention that returns its NaN instead of raising; an error check of good inputs fails too."""
    reference = refattn.get_backend("numpy")
    namespace = SimpleNamespace(**{name: getattr(refattn.fsat, name) for name in refattn.fsat.__all__})
    namespace.sparse_attention = sparse_attention_core  # the reference without its checks
    silent = Backend(name="silent", fsat=namespace, routing=refattn.routing,
                     capabilities=Capabilities(dtypes=("float64",), devices=("cpu",)))
    errors = [check for check in fsat_cases.checks("float64", quick=True) if check.error]
    assert {check.function for check in errors} == {"sparse_attention", "sparse_attention_vjp", "attention",
                                                    "attention_vjp"}
    assert {checks.run(check, reference, reference).status for check in errors} == {"pass"}
    failed = [checks.run(check, silent, reference) for check in errors if check.function == "sparse_attention"]
    assert len(failed) == 2 and {row.status for row in failed} == {"fail"}
    expected = ("raised 'no error', expected 'ValueError: q and k overflow float64 in the sparse attention: "
                "|q|·|k| up to 1.0e+320'")
    assert {row.detail for row in failed} == {expected}
    fine = dataclasses.replace(errors[0], inputs=dict(errors[0].inputs, q=np.zeros((2, 1, 5, 4))))
    assert checks.run(fine, reference, reference).detail == "the oracle expects no error here"
    assert checks.run(fine, silent, reference).detail == "the reference expects no error here"


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


def test_unsupported_dtypes_and_autograd_are_reported_as_skipped_with_the_reason() -> None:
    rows = runner.check_backend("numpy", quick=True)
    skipped = [row for row in rows if row.status == "skip" and row.function == "*"]
    assert {row.dtype for row in skipped} == {"float32", "bfloat16", "float16"}
    assert all(row.detail == f"numpy does not support {row.dtype}" for row in skipped)
    others = {(row.function.endswith(":autodiff"), row.detail) for row in rows
              if row.status == "skip" and row.function != "*"}
    assert others == {(True, "numpy declares no autograd (no autodiff hook)")}


def test_tolerance_table_is_the_one_in_the_spec() -> None:
    text = (REPO / "spec" / "interface.md").read_text()
    for dtype in tolerances.FORWARD:
        row = re.search(rf"^\| {dtype} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", text, re.MULTILINE)
        assert row, f"no {dtype} row in spec/interface.md"
        forward_rtol, forward_atol, gradient_rtol, gradient_atol = (float(cell) for cell in row.groups())
        assert tolerances.FORWARD[dtype] == tolerances.Tolerance(forward_rtol, forward_atol)
        assert tolerances.GRADIENT[dtype] == tolerances.Tolerance(gradient_rtol, gradient_atol)
    assert "|x − r| ≤ rtol · |r| + atol · m(r) + s" in text
    superscript = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
    for exponent, dtype in re.findall(r"2⁻([⁰¹²³⁴⁵⁶⁷⁸⁹]+) for (\w+)", text):
        assert tolerances.SMALLEST_SUBNORMAL[dtype] == 2.0 ** -int(exponent.translate(superscript)), dtype
    assert set(re.findall(r"2⁻[⁰¹²³⁴⁵⁶⁷⁸⁹]+ for (\w+)", text)) == set(tolerances.SMALLEST_SUBNORMAL)
    rtol, atol = re.search(r"finite differences .*? with rtol ([\d.e-]+), atol ([\d.e-]+) \(times", text,
                           re.DOTALL).groups()
    assert tolerances.FINITE_DIFFERENCES == tolerances.Tolerance(float(rtol), float(atol))


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
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    rows = json.loads(report.read_text())
    failures = [row for row in rows if row["status"] != "pass"]
    assert result.returncode == 0 and not failures, failures[:5]
    assert {row["dtype"] for row in rows} == set(tolerances.FORWARD)
    assert {row["algorithm"] for row in rows} == {"fsat", "routing"}


def test_parts_not_selected_are_reported_as_skipped() -> None:
    rows = runner.check_backend("numpy", quick=True, dtypes=("float64",), functions=("select",), parts=("ties",))
    assert {row.case for row in rows if row.status == "pass"} >= {"B2 H3 L5 integer scores causal noise padded K5"}
    assert {(row.case, row.detail) for row in rows if row.status == "skip" and row.function == "*"} == {
        (f"the {part} part", "not selected (--part)") for part in ("base", "extreme", "large")}


def test_every_device_and_strategy_is_run_and_reported() -> None:
    """A backend with two devices, two strategies of cross and one that exists on the second device only: each
    cross check runs five times."""
    forced = []

    def strategy(name, devices=None):
        return Strategy(name, ("fsat.cross",), lambda: _recording(forced, name), devices)

    backend = Backend(name="two", fsat=refattn.fsat, routing=refattn.routing,
                      capabilities=Capabilities(dtypes=("float64",), devices=("cpu", "cpu:1")),
                      strategies=(strategy("a"), strategy("b"), strategy("c", devices=("cpu:1",))))
    rows = runner.check_loaded(backend, quick=True, dtypes=("float64",), functions=("cross", "estimate"))
    crosses = [row for row in rows if row.function == "cross"]
    assert len(crosses) == 5 * len({row.case for row in crosses})
    assert {(row.device, row.strategy) for row in crosses} == {(d, s) for d in ("cpu", "cpu:1") for s in "ab"} | {
        ("cpu:1", "c")}
    assert {(row.device, row.strategy) for row in rows if row.function == "estimate"} == {("cpu", "-"), ("cpu:1", "-")}
    assert forced.count("a") == forced.count("b") == 2 * forced.count("c") == 2 * len(crosses) // 5
    table = io.StringIO()
    report.print_table(rows, table)
    assert re.search(r"fsat\.cross +float64 +cpu:1 +b ", table.getvalue())


@contextlib.contextmanager
def _recording(log, name):
    log.append(name)
    yield


def test_output_dtypes_are_checked() -> None:
    """float16 in, float32 out fails; so do int32 offsets; a float32 loss for float16 inputs passes."""
    torch = pytest.importorskip("torch")
    correct = refattn.get_backend("torch")
    reference = refattn.get_backend("numpy")

    def widened(ns, name, dtype):
        members = {member: getattr(ns, member) for member in ns.__all__}
        members[name] = lambda *a, **k: _cast(getattr(ns, name)(*a, **k), dtype)
        return SimpleNamespace(**members)

    wide = dataclasses.replace(correct, name="wide", fsat=widened(correct.fsat, "cross", torch.float32))
    narrow = dataclasses.replace(correct, name="narrow", fsat=widened(correct.fsat, "select", torch.int32))
    crosses = [check for check in fsat_cases.checks("float16", quick=True) if check.function == "cross"]
    assert {checks.run(check, correct, reference).status for check in crosses} == {"pass"}
    failed = {checks.run(check, wide, reference).detail for check in crosses}
    assert failed == {"output 0: dtype float32, expected float16"}
    select = next(check for check in fsat_cases.checks("float64", quick=True) if check.function == "select")
    assert checks.run(select, narrow, reference).detail == "output 0: dtype int32, expected int64"
    loss = next(check for check in routing_cases.checks("float16", quick=True) if check.function == "commitment_loss")
    assert checks.run(loss, correct, reference).status == "pass"  # torch returns the float32 accumulation


def _cast(value, dtype):
    return tuple(x.to(dtype) for x in value) if isinstance(value, tuple) else value.to(dtype)


def test_bfloat16_rounding_is_torch_s() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    values = rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)
    values = np.concatenate([values, [0.0, -0.0, np.inf, -np.inf, 3.3895e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8]])
    expected = torch.from_numpy(values).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(tolerances.round_to(values, "bfloat16"), expected)
    with np.errstate(over="ignore"):
        float16 = values.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(tolerances.round_to(values, "float16"), float16)


def test_tie_free_cases_are_tie_free_after_rounding_to_the_dtype() -> None:
    """Every ordinary select case in bfloat16: its K-th and (K+1)-th candidates differ by the margin
    after the inputs are rounded to bfloat16 (no accidental tie)."""
    for check in fsat_cases.checks("bfloat16"):
        if check.function == "select" and check.part == "base":
            k = int(check.case.rsplit("K", 1)[1])
            s = tolerances.round_to(check.inputs["s"], "bfloat16")
            noise = tolerances.round_to(check.inputs["noise"], "bfloat16")
            assert fsat_cases._tie_free(s, noise, k, "causal" in check.case, "bfloat16"), check.case


def test_deliberate_ties_follow_the_spec_rules() -> None:
    """Hand-worked: scores all equal pick -1, 1, -2, ...; route takes lower positions and puts -1 last;
    assign takes the lower centroid."""
    s = np.zeros((1, 1, 7))
    np.testing.assert_array_equal(refattn.fsat.select(s, 4), [[[-2, -1, 0, 1]]])
    np.testing.assert_array_equal(refattn.fsat.select(s, 3, causal=True), [[[-2, -1, 0]]])
    s[0, 0, 6] = 1.0  # tau = 3 now wins alone
    np.testing.assert_array_equal(refattn.fsat.select(s, 3), [[[-1, 0, 3]]])
    similarities = np.array([[[[1.0], [0.0], [1.0], [1.0]]]])
    np.testing.assert_array_equal(refattn.routing.route(similarities, 2), [[[[0, 2]]]])
    mask = np.array([[False, True, True, False]])
    np.testing.assert_array_equal(refattn.routing.route(similarities, 3, key_padding_mask=mask), [[[[0, 3, -1]]]])
    centroids = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    np.testing.assert_array_equal(refattn.routing.assign(np.array([[[[1.0, 1.0]]]]), centroids), [[[0]]])
    kinds = {check.function for check in runner.cases("float64", parts=("ties",))}
    assert kinds == {"select", "route", "assign", "commitment_loss", "commitment_loss_vjp", "commitment_loss:autodiff",
                     "update_centroids"}


def test_tolerances_scale_with_the_magnitude_of_the_expectation() -> None:
    """A gradient of 1e-5 off by a factor of 2 fails in every dtype; 1 ulp of bfloat16 passes, the tacl
    combine epsilon 1e-3 instead of 1e-2 (0.9 %) does not."""
    gradient = np.full(4, 1e-5)
    for dtype in tolerances.GRADIENT:
        assert not tolerances.compare(2 * gradient, gradient, tolerances.GRADIENT[dtype]).ok, dtype
        assert tolerances.compare(gradient * (1 + 1e-10), gradient, tolerances.GRADIENT[dtype]).ok, dtype
    combined = np.array([0.5, -1.0]) / 1.01
    bfloat16 = tolerances.FORWARD["bfloat16"]
    assert tolerances.compare(tolerances.round_to(combined, "bfloat16"), combined, bfloat16).ok
    assert not tolerances.compare(combined * 1.01 / 1.001, combined, bfloat16).ok
    assert tolerances.magnitude(np.array([-np.inf, 0.0, -3.0])) == 3.0
    assert tolerances.magnitude(np.zeros(3)) == 1.0
    tiny = np.array([3e-7])  # float16's spacing there is 6e-8: one step passes, two fail
    float16 = tolerances.FORWARD["float16"]
    assert tolerances.compare(tiny + 5.9e-8, tiny, float16, floor=tolerances.SMALLEST_SUBNORMAL["float16"]).ok
    assert not tolerances.compare(tiny + 1.2e-7, tiny, float16, floor=tolerances.SMALLEST_SUBNORMAL["float16"]).ok


def test_the_quick_flag_grid_covers_every_pair() -> None:
    for count in (3, 4, 5):
        names = [f"f{i}" for i in range(count)]
        rows = checks.flag_grid(names, quick=True)
        assert len(rows) == count + 1
        for first, second in itertools.combinations(names, 2):
            assert {(row[first], row[second]) for row in rows} == {(a, b) for a in (False, True) for b in (False, True)}
    assert len(checks.flag_grid(["a", "b", "c"], quick=False)) == 8
    quick = routing_cases.QUICK_CONFIGURATIONS
    full = [row[1:] for row in routing_cases._configurations([routing_cases.SHAPES[0]], quick=False)]
    for first, second in itertools.combinations(range(4), 2):
        assert {(row[first], row[second]) for row in quick} == {(row[first], row[second]) for row in full}


def test_a_wrong_gradient_fails_the_directional_check() -> None:
    rng = np.random.default_rng(0)
    x, cotangent = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    projection = gradcheck.directional_vjp(np.sin, (x,), cotangent, rng)
    right = float((np.cos(x) * cotangent * projection.directions[0]).sum())
    assert abs(right - projection.value) < 1e-8
    wrong = float((1.01 * np.cos(x) * cotangent * projection.directions[0]).sum())
    assert abs(wrong - projection.value) > 1e-4


def test_the_torch_autodiff_hook_differentiates_the_forward() -> None:
    """Gradients of fsat.sparse_attention through the hook equal the reference VJP, bias and lse included."""
    torch = pytest.importorskip("torch")
    backend = refattn.get_backend("torch")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 6, 3)) for _ in range(3))
    offsets, bias = np.array([[[-1, 0, 2], [0, 1, 3]]]), rng.standard_normal((1, 2, 3))
    dout, dlse = rng.standard_normal((1, 2, 6, 3)), rng.standard_normal((1, 2, 6))
    tensors = [torch.from_numpy(a) for a in (q, k, v, bias)]
    grads = backend.autodiff(lambda q, k, v, b: backend.fsat.sparse_attention(q, k, v, torch.from_numpy(offsets), b),
                             tuple(tensors), (torch.from_numpy(dout), torch.from_numpy(dlse)))
    expected = refattn.fsat.sparse_attention_vjp(q, k, v, offsets, bias, dout, dlse=dlse)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
