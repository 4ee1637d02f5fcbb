"""Benchmarks of refattn's backends: FLOP/byte/memory models, cases, the sweep, the targets and their report.

- :mod:`.models`: analytic FLOPs (attended elements + FFT / k-means, and dense-equivalent), bytes, and
  what FSAT's forward + backward must retain (:func:`.models.fsat_retained_bytes`);
- :mod:`.measure`: timing (warm-up, median, IQR), peak memory above the inputs (tracemalloc, torch's
  CPU allocator events through the profiler, exact and silent; CUDA allocator, CuPy pool), the memory
  guards for long sequences, and the machine's description;
- :mod:`.cases`: one timed callable per (backend, algorithm, direction, dtype, shape), shared by the
  pytest-benchmark suite (tests/benchmarks), the sweep and the targets;
- :mod:`.runner`: ``refattn bench``: its options, the sweep, table, JSON, PNG plots;
- :mod:`.targets`: the performance targets (CPU and GPU) and the rule that judges them.

Importing this package imports neither torch nor matplotlib.
"""

from .cases import ALGORITHMS, DIRECTIONS, LENGTHS, PEER, Case, Shape, Unsupported, build_case

__all__ = ["ALGORITHMS", "DIRECTIONS", "LENGTHS", "PEER", "Case", "Shape", "Unsupported", "build_case"]
