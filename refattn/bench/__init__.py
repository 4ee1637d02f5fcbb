"""Benchmarks of refattn's backends: FLOP/byte models, cases, the sweep and its report.

- :mod:`.models`: analytic FLOPs (attended elements + FFT / k-means, and dense-equivalent) and bytes;
- :mod:`.measure`: timing (warm-up, median, IQR), peak memory (tracemalloc, torch profiler memory
  events, CUDA allocator, CuPy pool) and the machine's description;
- :mod:`.cases`: one timed callable per (backend, algorithm, direction, dtype, shape), shared by the
  pytest-benchmark suite (tests/benchmarks) and the sweep;
- :mod:`.runner`: ``refattn bench``: sweep, table, JSON, PNG plots;
- :mod:`.targets`: the performance targets (speed and memory against dense attention and the peer).

Importing this package imports neither torch nor matplotlib.
"""

from .cases import ALGORITHMS, DIRECTIONS, LENGTHS, PEER, Case, Shape, Unsupported, build_case

__all__ = ["ALGORITHMS", "DIRECTIONS", "LENGTHS", "PEER", "Case", "Shape", "Unsupported", "build_case"]
