"""``refattn bench``'s measurements: the torch CPU peak memory is exact and silent, the memory guards keep long
sequences from crashing the machine, the sweep stops a series where it cannot fit, the table labels what NumPy
computes in, the plots carry the O(L log L) and O(L²) guides, and the command prints no profiler noise."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refattn.bench import cases, measure, runner

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


@needs_torch
def test_torch_cpu_peak_is_exact_to_the_byte_and_silent(capfd: pytest.CaptureFixture[str]) -> None:
    import torch

    earlier = [torch.empty(10_000_000, dtype=torch.uint8)]  # allocated before the call, freed inside it

    def fn() -> Any:
        earlier.pop()  # frees 10 MB the call did not allocate: not counted, and the sum does not drop
        a = torch.empty(3_000_000, dtype=torch.uint8)
        b = torch.empty(5_000_000, dtype=torch.uint8)  # 8,000,000 live: the peak
        del a
        c = torch.empty(1_000_000, dtype=torch.uint8)
        d = torch.ones(250_000, dtype=torch.float32)  # 1,000,000 bytes: 7,000,000 live
        return b, c, d

    capfd.readouterr()
    assert measure.peak_torch_cpu(fn) == 8_000_000
    assert measure.peak_torch_cpu(lambda: torch.zeros(123_457, dtype=torch.float64)) == 8 * 123_457
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # no 'USDT: ... profiler_start', no 'CPUAllocator.cpp ... unknown size'


def test_the_stderr_filter_drops_only_the_profilers_lines(capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with measure.native_stderr_filtered(measure.PROFILER_NOISE):
        os.write(2, b"USDT:2026-12-01 23:48:55 10753:10753 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W1201 23:52:52.748158090 CPUAllocator.cpp:245] Memory block of unknown size was allocated "
                    b"before the profiling started, profiler results will not include the deallocation event\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"


def test_numpy_peak_is_the_allocation() -> None:
    peak = measure.peak_numpy(lambda: np.ones(1_000_000))
    assert 8_000_000 <= peak < 8_000_000 + 4096  # the buffer and its array object


no_cuda_devices = pytest.mark.skipif(bool(measure.nvidia_devices()),
                                     reason="NVIDIA devices present: the address-space limit is off (CUDA contexts)")


@no_cuda_devices
def test_the_address_space_limit_turns_an_oversized_allocation_into_a_clean_error() -> None:
    before = resource.getrlimit(resource.RLIMIT_AS)
    with measure.address_space_limit(256 * 2**20):
        np.ones(10_000_000)  # 80 MB fits
        with pytest.raises(MemoryError) as error:
            np.ones(2**30)  # 8 GiB does not
    assert measure.out_of_memory(error.value)
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    np.ones(50_000_000)  # 400 MB again after the limit is lifted


@needs_torch
@no_cuda_devices
def test_torch_allocations_beyond_the_limit_fail_cleanly_too() -> None:
    import torch

    with measure.address_space_limit(128 * 2**20), pytest.raises(RuntimeError) as error:
        torch.empty(2**31, dtype=torch.uint8)
    assert measure.out_of_memory(error.value)


def test_a_case_that_cannot_fit_is_skipped_before_anything_is_allocated() -> None:
    shape = cases.Shape(batch=1, heads=8, length=2**21, dim=64, top_k=16)
    # q, k, v float32 (3 x 4 GiB) and the output (4 GiB): 16 GiB at least
    assert cases.minimum_bytes("fsat", "fwd", "float32", shape) == 16 * 2**30
    # + dout (4 GiB), dq, dk, dv (12 GiB)
    assert cases.minimum_bytes("fsat", "fwdbwd", "float32", shape) == 32 * 2**30
    # bfloat16 inputs are drawn in float32 first
    assert cases.minimum_bytes("fsat", "fwd", "bfloat16", shape) == 12 * 2**30 + 2 * 2**30
    with pytest.raises(cases.Unsupported, match=r"needs at least 16.0 GiB \(inputs, output and gradients\), "
                                                r"8.0 GiB available"):
        cases.build_case("numpy", "fsat", "fwd", "float32", shape, memory_available=8 * 2**30)


def test_inputs_are_drawn_in_the_dtype_they_are_used_in() -> None:
    shape = cases.Shape(batch=1, heads=2, length=16, dim=4, top_k=2)
    case = cases.build_case("numpy", "fsat", "fwd", "float32", shape)
    assert case.info["input_bytes"] == 4 * (3 * 2 * 16 * 4 + 2 * 4)  # q, k, v, w in float32; no dout forward
    assert case.info["compute_dtype"] == "float64"


def _fake_sweep_case(monkeypatch: pytest.MonkeyPatch, seconds: dict[int, float]) -> list[int]:
    """Cases that take ``seconds[L]`` (measured through a fake time_calls); returns the lengths built."""
    built: list[int] = []

    def build_case(backend: str, algorithm: str, direction: str, dtype: str, shape: cases.Shape,
                   **kw: Any) -> cases.Case:
        if kw["memory_available"] is not None:
            needed = cases.minimum_bytes(algorithm, direction, dtype, shape)
            if needed > kw["memory_available"]:
                raise cases.Unsupported(f"needs at least {needed} bytes")
        built.append(shape.length)
        info = {"flops": cases.flops(algorithm, direction, shape), "dense_flops": 1.0, "bytes": 1.0,
                "compute_dtype": dtype}
        return cases.Case(backend, algorithm, direction, dtype, "cpu", shape, lambda: shape.length, "fake", info)

    def time_calls(fn: Any, **kw: Any) -> list[float]:
        built.append((kw["warmup"], kw["repeats"]))
        return [seconds[fn()]]

    monkeypatch.setattr(cases, "build_case", build_case)
    monkeypatch.setattr(measure, "time_calls", time_calls)
    return built


def test_the_sweep_stops_a_series_whose_next_call_would_exceed_the_call_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _fake_sweep_case(monkeypatch, {1024: 1.0, 2048: 2.2, 4096: 5.0, 8192: 11.0})
    results = runner.sweep(backends=["numpy"], algorithms=["dense"], lengths=[4096, 1024, 2048, 8192],
                           directions=["fwd"], dtypes=["float32"], batch=1, call_budget=10.0, max_seconds=8.0,
                           repeats=5, warmup=1, memory=False, progress=False)
    # dense is O(L²): 2.2 s at 2,048 predicts 8.8 s at 4,096 (run, and longer than the 8 s timing budget: once,
    # without a warm-up call), then 5.0 s predicts 20 s at 8,192 (not run)
    assert built == [1024, (1, 5), 2048, (1, 5), 4096, (0, 1)]
    skipped = results[-1]
    assert (skipped["length"], skipped["status"]) == (8192, "skipped")
    assert skipped["reason"] == ("predicted 20 s per call (from 5 s at L=4096, scaled by the FLOP model) exceeds the "
                                 "call budget of 10 s")


def test_the_sweep_stops_a_series_that_does_not_fit_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _fake_sweep_case(monkeypatch, {64: 0.1, 128: 0.1, 256: 0.1})
    budget_gib = cases.minimum_bytes("fsat", "fwd", "float32", cases.Shape(1, 8, 128, 64)) / 2**30
    results = runner.sweep(backends=["numpy"], algorithms=["fsat"], lengths=[64, 128, 256], directions=["fwd"],
                           dtypes=["float32"], batch=1, memory_budget=budget_gib, memory=False, progress=False)
    assert [length for length in built if isinstance(length, int)] == [64, 128]
    assert results[-1]["status"] == "skipped" and results[-1]["reason"].startswith("needs at least")


def test_the_table_labels_rows_with_the_dtype_they_were_computed_in() -> None:
    shape = cases.Shape(batch=1, heads=2, length=16, dim=4, top_k=2)
    results = runner.sweep(backends=["numpy"], algorithms=["fsat"], lengths=[16], directions=["fwd"],
                           dtypes=["float32"], batch=1, heads=shape.heads, dim=shape.dim, top_k=2, repeats=1,
                           warmup=0, progress=False)
    text = runner.table(results)
    row = text.splitlines()[2].split()
    assert row[:4] == ["numpy", "fsat", "fwd", "float64*"]
    assert "* computed in this dtype from inputs drawn for another: the NumPy reference computes in float64" in text


class FakeAxes:
    def __init__(self) -> None:
        self.lines: list[tuple[list[int], list[float], str]] = []

    def plot(self, xs: list[int], ys: list[float], style: str, **kw: Any) -> None:
        self.lines.append((list(xs), list(ys), kw.get("label", "")))


def test_the_guides_grow_as_b_l_log_l_and_b_l_squared_through_the_fsat_series() -> None:
    rows = [{"backend": backend, "algorithm": algorithm, "length": length, "batch": batch, "median_s": seconds}
            for backend, algorithm, points in (
                ("torch", "fsat", ((1024, 4, 0.5), (4096, 1, 0.8), (16384, 1, 3.0))),
                ("torch", "dense", ((1024, 4, 0.1), (4096, 1, 0.6))))
            for length, batch, seconds in points]
    ax = FakeAxes()
    runner._guides(ax, rows, "median_s", 1.0)
    (xs, log_guide, log_label), (_, square_guide, square_label) = ax.lines
    assert xs == [1024, 4096, 16384]
    assert (log_label, square_label) == ("O(L log L) through torch fsat", "O(L²) through torch fsat")
    assert log_guide[0] == pytest.approx(0.5) and square_guide[0] == pytest.approx(0.5)  # through FSAT's first point
    unit = 0.5 / (4 * 1024 * 10)
    assert log_guide == pytest.approx([unit * b * n * math.log2(n) for n, b in ((1024, 4), (4096, 1), (16384, 1))])
    unit = 0.5 / (4 * 1024**2)
    assert square_guide == pytest.approx([unit * b * n * n for n, b in ((1024, 4), (4096, 1), (16384, 1))])


@needs_torch
@pytest.mark.parametrize("progress", [False, True], ids=["no-progress", "progress"])
def test_bench_prints_no_profiler_noise(progress: bool, tmp_path: Path) -> None:
    """The report: torch profiler lines on every memory measurement, also with --no-progress."""
    argv = [sys.executable, "-m", "refattn", "bench", "--backend", "numpy", "--backend", "torch", "--algorithm", "fsat",
            "--length", "32", "--heads", "1", "--dim", "4", "--top-k", "2", "--direction", "fwdbwd", "--repeats", "1",
            "--no-plots", "--out", str(tmp_path)] + ([] if progress else ["--no-progress"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for noise in ("USDT", "profiler_start", "CPUAllocator", "Memory block of unknown size", "Warning"):
        assert noise not in result.stdout + result.stderr, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()[1:2] == ["fsat"]}
    assert rows["numpy"][3] == "float64*" and rows["torch"][3] == "float32"
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["machine"]["date"] and "torch_threads" in payload["machine"]
    assert all(r["peak_bytes"] > 0 for r in payload["results"])


def test_the_address_space_limit_stays_off_where_cuda_contexts_may_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA context reserves far more address space than memory: a limit would make CUDA fail to start."""
    monkeypatch.setattr(measure, "nvidia_devices", lambda: ["/dev/nvidia0"])
    before = resource.getrlimit(resource.RLIMIT_AS)
    with measure.address_space_limit(2**20):
        assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_interleaved_times_alternate_the_calls_after_one_untimed_call_each() -> None:
    """a, b untimed, then (a, b) per pair; each side's seconds are its own calls' clock differences."""
    order: list[str] = []
    ticks = iter(range(100))
    times = measure.interleaved_times([lambda: order.append("a"), lambda: order.append("b")], 3,
                                      clock=lambda: float(next(ticks)) ** 2)
    assert order == ["a", "b"] * 4
    assert times == [[1.0, 9.0, 17.0], [5.0, 13.0, 21.0]]  # clock 0, 1, 4, 9, ...: a 0 to 1, b 4 to 9, a 16 to 25
    with pytest.raises(ValueError, match="pairs: expected an integer >= 1, got 0"):
        measure.interleaved_times([lambda: None], 0)
