"""FSAT attention (backend.fsat.attention) on every backend: time, FLOPs, peak memory.

Smoke shapes by default; the real sweep with --benchmark-only (see conftest.py).
"""

def test_fsat(benchmark, run_benchmark, settings, backend, direction, dtype, length):
    run_benchmark(benchmark, settings, backend, "fsat", direction, dtype, length)
