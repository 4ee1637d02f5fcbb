"""Routing attention (backend.routing.attention, profile 'lucidrains') on every backend, and the peer
lucidrains KmeansAttention (eval mode, the same fixed centroids, C and W, and inputs) in the same groups.

Smoke shapes by default; the real sweep with --benchmark-only (see conftest.py).
"""

def test_routing(benchmark, run_benchmark, settings, backend, direction, dtype, length):
    run_benchmark(benchmark, settings, backend, "routing", direction, dtype, length)
