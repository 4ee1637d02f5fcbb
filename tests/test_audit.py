"""``refattn audit``: every planned CUDA launch of every backend with plans, at realistic shapes, within
CUDA's limits and its function's memory bound; violations fail it, bad options are usage errors."""

from __future__ import annotations

import argparse

import pytest

from refattn import audit, cli
from refattn.backends import Backend, Capabilities
from refattn.backends.launch import FunctionPlan, Launch, Shape


def test_the_table_spans_the_required_shapes():
    table = audit.shapes()
    assert max(s.length for s in table) == 1_048_576 and min(s.length for s in table) == 1
    assert max(s.batch * s.heads for s in table) == 65_536 and min(s.batch * s.heads for s in table) == 1
    assert {s.dim for s in table} == {64, 128} and {s.top_k for s in table} == {16}
    assert max(s.clusters for s in table) == max(s.window for s in table) == 256


def test_every_numba_launch_is_within_the_limits_at_every_shape(capsys):
    """The regression test of the launch limits: at L = 2^20 the similarity, its VJP and the route keys
    put their L tiles on grid.y (over 65,535) and B·H = 65,536 broke the kernels with B·H on grid.y or
    grid.z; now every launch of every function fits, and so does every memory peak."""
    pytest.importorskip("numba")
    code = cli.main(["audit", "--backend", "numba_cuda"])
    out = capsys.readouterr().out
    assert code == 0, "\n".join(line for line in out.splitlines() if "VIOLATION" in line)
    assert out.rstrip().endswith(": 0 violations")
    rows = [line.split() for line in out.splitlines() if line.startswith("numba_cuda ")]
    functions = {row[1] for row in rows}
    assert {"fsat.attention_vjp", "routing.attention_vjp", "routing.similarity", "routing.route"} <= functions
    for function in functions:
        shapes = {row[3] + row[4] + row[5] for row in rows if row[1] == function}
        assert any("L1048576" in shape for shape in shapes), function
        assert any("B4096H16" in shape for shape in shapes), function  # B·H = 65,536


def _backend(plan: FunctionPlan) -> Backend:
    return Backend("fake", None, None, Capabilities(("float32",), ()), plans=lambda shape, dtype: [plan])


def _arguments(**options) -> argparse.Namespace:
    defaults = dict(parser=argparse.ArgumentParser(), backend=None, dtype=None, function=None, traffic=False)
    return argparse.Namespace(**{**defaults, **options})


def test_a_launch_over_the_limits_fails_the_audit(monkeypatch, capsys):
    wide = Launch("similarity_k", grid=(16, 65_536, 1), block=(16, 16, 1))
    plan = FunctionPlan("fake", "routing.similarity", Shape(1, 8, 1_048_576, 64, 64), "float32", (wide,), 10, 100,
                        "100 B")
    monkeypatch.setattr(audit, "auditable", lambda: {"fake": _backend(plan)})
    assert audit.run(_arguments()) == 1
    out = capsys.readouterr().out
    assert "VIOLATION fake routing.similarity float32" in out and "grid.y = 65536 outside [1, 65535]" in out


def test_a_memory_peak_over_its_bound_fails_the_audit(monkeypatch, capsys):
    plan = FunctionPlan("fake", "fsat.cross", Shape(1, 8, 65_536, 64, 64), "float32",
                        (Launch("k", (1, 1, 1), (32, 1, 1)),), 2_000, 1_000, "the output")
    monkeypatch.setattr(audit, "auditable", lambda: {"fake": _backend(plan)})
    assert audit.run(_arguments(dtype=["float32"])) == 1
    assert "device-memory peak 2000 B > the bound 1000 B (the output)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nope"], "argument --backend: 'nope' has no launch plans here (not registered); choose from:"),
    (["--backend", "numpy"], "argument --backend: 'numpy' has no launch plans here"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16' (choose from"),
    (["--function", "fsat.nope"], "argument --function: unknown function 'fsat.nope'; choose from fsat."),
])
def test_bad_options_are_usage_errors_listing_the_choices(argv, message, capsys):
    pytest.importorskip("numba")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["audit", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_traffic_report_lists_every_launch_of_one_shape(capsys):
    pytest.importorskip("numba")
    assert cli.main(["audit", "--backend", "numba_cuda", "--traffic", "--function", "fsat.sparse_attention"]) == 0
    out = capsys.readouterr().out
    assert "sparse_forward_k" in out and "(total)" in out
    assert "over 1 shapes x 1 dtypes: 0 violations" in out
