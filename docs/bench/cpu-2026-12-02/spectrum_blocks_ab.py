"""Interleaved A/B: FSAT fwd+bwd (torch, float32, B = 1, H = 8, D = 64, K = 16) with one head's spectra at once
(SPECTRUM_BYTES unbounded: the previous behaviour) against blocks of at most 16 MiB.

    python docs/bench/cpu-2026-12-02/spectrum_blocks_ab.py LENGTH PAIRS
"""

import gc
import importlib
import statistics
import sys
import time

from refattn.bench import cases

estimate = importlib.import_module("refattn.backends.torch.fsat.estimate")
length, pairs = int(sys.argv[1]), int(sys.argv[2])
case = cases.build_case("torch", "fsat", "fwdbwd", "float32", cases.Shape(1, 8, length, 64, top_k=16), device="cpu",
                        dense_max_gflop=float("inf"), dense_max_bytes=float("inf"), memory_available=20 * 2**30)
sides = {"one block per head": 2**62, "16 MiB blocks": 2**24}


def timed(limit: int) -> float:
    estimate.SPECTRUM_BYTES = limit
    gc.collect()
    start = time.perf_counter()
    case.fn()
    return time.perf_counter() - start


for limit in sides.values():
    timed(limit)
times: dict[str, list[float]] = {name: [] for name in sides}
for _ in range(pairs):
    for name, limit in sides.items():
        times[name].append(timed(limit))
for name, values in times.items():
    print(f"L={length} {name}: median {statistics.median(values) * 1e3:.1f} ms, "
          f"range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
ratios = [old / new for old, new in zip(*times.values(), strict=True)]
print(f"L={length} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, "
      f"range {min(ratios):.3f}-{max(ratios):.3f}")
