"""The Numba-CUDA backend against the conformance suite: in the CUDA simulator here, on a device where one exists.

The simulator must be switched on before numba is imported, so every run is a subprocess with
NUMBA_ENABLE_CUDASIM=1. The simulator is slow (about 0.3 ms per thread, and a few ms per barrier of
a small block), so each algorithm's quick grid runs as two processes in parallel, one per dtype, and
in the simulator without the grid's ``large`` part (L = 64, D = 32: too slow there; a GPU runs it).
The backend has no autograd hook: its ``:autodiff`` checks are reported as skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")


def _env(simulator: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


SIMULATED_PARTS = ("base", "ties", "extreme")
NOT_SIMULATED = ("the large part of the grid (L = 64, D = 32) is left out in the CUDA simulator, which runs each "
                 "thread in Python (about 0.3 ms per thread): too slow for CI; on a GPU every part runs")


def _run_parallel(tmp_path, simulator: bool, algorithm: str, *, quick: bool = True):
    processes = {}
    parts = [argument for part in SIMULATED_PARTS for argument in ("--part", part)] if simulator else []
    if simulator:
        print(NOT_SIMULATED)
    for dtype in ("float64", "float32"):
        path = tmp_path / f"{algorithm}-{dtype}.json"
        command = [sys.executable, "-m", "refattn", "conformance", "--backend", "numba_cuda",
                   "--algorithm", algorithm, "--dtype", dtype, "--json", str(path)] + (["--quick"] if quick else []) \
            + parts
        processes[dtype] = (subprocess.Popen(command, env=_env(simulator), stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True), path)
    results = {}
    for dtype, (process, path) in processes.items():
        output, _ = process.communicate(timeout=900)
        print(output)
        rows = json.loads(path.read_text()) if path.exists() else []
        results[dtype] = (process.returncode, output, rows)
    return results


FSAT_FUNCTIONS = {"pair_counts", "cross", "cross_vjp", "estimate", "estimate_vjp", "select", "sparse_attention",
                  "sparse_attention_vjp", "attention", "attention_vjp"}
FSAT_FLOAT64_ONLY = {"pair_counts"}  # integer counts: checked once
# The cluster-attention checks run on members from the naive route.
ROUTING_FUNCTIONS = {"normalize", "normalize_vjp", "similarity", "similarity_vjp", "route", "assign",
                     "update_centroids", "commitment_loss", "commitment_loss_vjp", "cluster_attention",
                     "cluster_attention_vjp", "combine", "combine_vjp", "local_attention",
                     "local_attention_vjp", "attention", "attention_vjp"}
EXPECTED_SKIPS = {"numba_cuda declares no autograd (no autodiff hook)", "not selected (--part)"}


def _assert_passes(results, functions, float64_only=frozenset()):
    """Both dtypes exited 0, every row passed but the expected skips (autograd, the parts not
    simulated), and exactly ``functions`` were checked (less ``float64_only`` in float32)."""
    for dtype, (code, output, rows) in results.items():
        assert code == 0, f"{dtype}: exit {code}\n{output[-4000:]}"
        failed = [row for row in rows if row["status"] != "pass" and row["detail"] not in EXPECTED_SKIPS]
        assert not failed, failed[:5]
        covered = {row["function"] for row in rows if row["status"] == "pass"}
        expected = functions - (float64_only if dtype != "float64" else set())
        assert covered == expected, f"{dtype}: functions checked {sorted(covered)}"
        assert {row["detail"] for row in rows if row["status"] == "skip"} <= EXPECTED_SKIPS


def test_fsat_conformance_in_the_simulator(tmp_path):
    """Every fsat function, forward and VJP, both dtypes, the quick grid, against the reference."""
    _assert_passes(_run_parallel(tmp_path, True, "fsat"), FSAT_FUNCTIONS, FSAT_FLOAT64_ONLY)


def test_routing_conformance_in_the_simulator(tmp_path):
    """Every routing function (init_centroids aside: its draws are backend-specific), forward and VJP,
    both dtypes, the quick grid, against the reference."""
    _assert_passes(_run_parallel(tmp_path, True, "routing"), ROUTING_FUNCTIONS)


def test_backend_reports_the_simulator():
    code = ("from refattn import backends; b = backends.get_backend('numba_cuda'); "
            "print(b.status); assert b.capabilities.devices == ('cuda',), b.capabilities; "
            "assert 'CUDA simulator' in b.status")
    done = subprocess.run([sys.executable, "-c", code], env=_env(True), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _device_present() -> tuple[bool, str]:
    code = "from numba import cuda; print(cuda.is_available())"
    done = subprocess.run([sys.executable, "-c", code], env=_env(False), capture_output=True, text=True)
    present = done.stdout.strip().endswith("True")
    return present, "no CUDA device or driver on this machine (the simulator runs cover it here)"


def test_without_a_device_the_backend_says_why():
    present, _ = _device_present()
    if present:
        pytest.skip("a CUDA device is present")
    code = ("from refattn import backends; b = backends.get_backend('numba_cuda'); "
            "assert b.capabilities.devices == (), b.capabilities; assert b.capabilities.unavailable; print(b.status)")
    done = subprocess.run([sys.executable, "-c", code], env=_env(False), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fsat_conformance_on_a_device_full_grid(tmp_path):
    """On a machine with a GPU: the same checks, full grid, on the device (skipped here with the reason)."""
    present, reason = _device_present()
    if not present:
        pytest.skip(reason)
    _assert_passes(_run_parallel(tmp_path, False, "fsat", quick=False), FSAT_FUNCTIONS, FSAT_FLOAT64_ONLY)


def test_routing_conformance_on_a_device_full_grid(tmp_path):
    """On a machine with a GPU: the routing checks, full grid, on the device (skipped here with the reason)."""
    present, reason = _device_present()
    if not present:
        pytest.skip(reason)
    _assert_passes(_run_parallel(tmp_path, False, "routing", quick=False), ROUTING_FUNCTIONS)
