"""The dense baseline: torch scaled_dot_product_attention and NumPy dense softmax attention, while
they fit (the skip reason says when they do not).

Smoke shapes by default; the real sweep with --benchmark-only (see conftest.py).
"""

def test_dense(benchmark, run_benchmark, settings, backend, direction, dtype, length):
    run_benchmark(benchmark, settings, backend, "dense", direction, dtype, length)
