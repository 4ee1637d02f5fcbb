"""The benchmark suite's configuration: smoke mode by default, the real sweep on request.

Default ``pytest`` (and CI) runs every case once on tiny shapes (L = 64, 256; H = 2, D = 16; float32,
which the NumPy reference computes in float64 as always), so the
suite is exercised in well under a minute; each case is timed by one pedantic round with no
warm-up, which is what ``--benchmark-disable`` does as well. The real sweep (L = 1024 ... 65536,
B·L = 16384 tokens, H = 8, D = 64, K = 16, routing C = round(sqrt L), W = ceil(L / C), warm-up and
several rounds) runs with any of:

    pytest tests/benchmarks --benchmark-only [--benchmark-json out.json] [--benchmark-group-by=group]
    pytest tests/benchmarks --bench-full      (only when tests/benchmarks is on the command line)
    REFATTN_BENCH_FULL=1 pytest tests/benchmarks

Backends that cannot run here (library missing, no device, dtype unsupported, dense too large)
are skipped with the reason.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'refattn[bench]')")

from refattn import bench  # noqa: E402
from refattn.bench import cases, measure  # noqa: E402

SMOKE = {"lengths": (64, 256), "tokens": 256, "heads": 2, "dim": 16, "top_k": 4, "rounds": 1, "warmup": 0,
         "dtypes": ("float32",)}
FULL = {"lengths": bench.LENGTHS, "tokens": 16384, "heads": 8, "dim": 64, "top_k": 16, "rounds": 3, "warmup": 1,
        "dtypes": ("float32", "float64")}
# Dense baselines above these budgets are skipped (the reason says so): SDPA at L = 16384, B = 1
# fwd+bwd is ~1,900 GFLOP; NumPy's per-head float64 matmuls run at a few GFLOP/s.
DENSE_MAX_GFLOP = {"numpy": 150.0}
DENSE_MAX_GFLOP_DEFAULT = 2500.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="refattn benchmarks: the real sweep (L up to 65536) instead of smoke shapes")


def full_mode(config: pytest.Config) -> bool:
    return bool(
        os.environ.get("REFATTN_BENCH_FULL", "") not in ("", "0")
        or _option(config, "bench_full")
        or _option(config, "benchmark_only")
    )


def _option(config: pytest.Config, name: str) -> Any:
    try:
        return config.getoption(name)
    except ValueError:
        return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "length" in metafunc.fixturenames:
        settings = FULL if full_mode(metafunc.config) else SMOKE
        metafunc.parametrize("length", settings["lengths"], ids=lambda n: f"L{n}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", (FULL if full_mode(metafunc.config) else SMOKE)["dtypes"])
    if "backend" in metafunc.fixturenames:  # every registered backend; the peer with routing only
        names = [name for name in cases.available_backends()
                 if name != cases.PEER or metafunc.function.__name__ == "test_routing"]
        metafunc.parametrize("backend", names)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    info = measure.machine_info()
    keys = ("cpu", "cpu_count", "memory_gib", "torch", "torch_threads", "cuda_device", "cuda_version", "load_average")
    machine_info["refattn"] = {key: info[key] for key in keys if key in info}


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    return FULL if full_mode(request.config) else SMOKE


@pytest.fixture(params=cases.DIRECTIONS)
def direction(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run_benchmark() -> Any:
    """The test body shared by the three modules: ``run_benchmark(benchmark, settings, backend,
    algorithm, direction, dtype, length)``."""
    return _run_benchmark


def _run_benchmark(benchmark: Any, settings: dict[str, Any], backend: str, algorithm: str, direction: str,
                   dtype: str, length: int) -> Any:
    """Build the case (skip with its reason), time it, record extra_info, check the result."""
    if backend == "numpy" and dtype != "float64" and settings is FULL:
        pytest.skip("the NumPy reference computes in float64 whatever its inputs: timed at float64 only")
    shape = cases.Shape(cases.batch_for(length, settings["tokens"]), settings["heads"], length, settings["dim"],
                        settings["top_k"])
    try:
        case = cases.build_case(backend, algorithm, direction, dtype, shape,
                                dense_max_gflop=DENSE_MAX_GFLOP.get(backend, DENSE_MAX_GFLOP_DEFAULT))
    except cases.Unsupported as error:
        pytest.skip(str(error))
    benchmark.group = f"{direction}-L{length}-{dtype}"
    benchmark.extra_info.update(case.info)
    result = benchmark.pedantic(case.fn, rounds=settings["rounds"], iterations=1, warmup_rounds=settings["warmup"])
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["median_s"] = stats.median
        benchmark.extra_info["gflops"] = case.info["flops"] / stats.median / 1e9
        benchmark.extra_info["dense_equiv_gflops"] = case.info["dense_flops"] / stats.median / 1e9
        benchmark.extra_info["gbps"] = case.info["bytes"] / stats.median / 1e9
    peak, method = case.peak_memory()
    benchmark.extra_info["peak_bytes"] = peak
    benchmark.extra_info["memory_method"] = method
    check_result(result, case)
    return result


def check_result(result: Any, case: cases.Case) -> None:
    """The timed call returned finite arrays of the expected leading shape (correctness is the
    conformance suite's job; this catches a benchmark that times an error path)."""
    import numpy as np

    items = result if isinstance(result, (list, tuple)) else [result]
    expected = (case.shape.batch, case.shape.heads, case.shape.length)
    for item in items:
        if item is None:
            continue
        array = item.detach().cpu().double().numpy() if hasattr(item, "detach") else np.asarray(item)
        if array.ndim == 4:
            assert array.shape[:3] == expected, (array.shape, expected)
        assert np.isfinite(array).all(), f"{case.backend}/{case.algorithm} {case.direction}: non-finite result"
