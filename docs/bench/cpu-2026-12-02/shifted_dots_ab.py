"""Interleaved A/B: FSAT fwd+bwd (torch, float32, B = 1, H = 8, D = 64, K = 16) with shifted_dots zeroing the rows
without a partner column by column (the previous code, copied here) against one contiguous fill per chunk.

    python docs/bench/cpu-2026-12-02/shifted_dots_ab.py LENGTH PAIRS
"""

import gc
import importlib
import statistics
import sys
import time

import torch

from refattn.bench import cases

module = importlib.import_module("refattn.backends.torch.fsat.sparse_attention")


def column_zeroing(pairs, x, y):
    """shifted_dots before: sliced shifts only (the benchmark's case)."""
    dots = torch.empty(x.shape[:3] + (len(pairs),), dtype=x.dtype, device=x.device)
    product = None
    for b, h, start, stop, spans in module.sliced_chunks(pairs, x.shape, x.shape[3], module.CHUNK_ELEMENTS):
        if product is None:
            product = x.new_empty(stop - start, x.shape[3])
        block = dots[b, h, start:stop]
        for m, (first, end, tau) in enumerate(spans):
            low, high = max(start, first), min(stop, end)
            if low >= high:
                block[:, m].zero_()
                continue
            block[: low - start, m].zero_()
            block[high - start :, m].zero_()
            chunk = product[: high - low]
            torch.mul(x[b, h, low:high], y[b, h, low + tau : high + tau], out=chunk)
            torch.sum(chunk, dim=-1, out=block[low - start : high - start, m])
    return dots


length, pairs = int(sys.argv[1]), int(sys.argv[2])
case = cases.build_case("torch", "fsat", "fwdbwd", "float32", cases.Shape(1, 8, length, 64, top_k=16), device="cpu",
                        dense_max_gflop=float("inf"), dense_max_bytes=float("inf"), memory_available=20 * 2**30)
sides = {"column by column": column_zeroing, "one fill per chunk": module.shifted_dots}


def timed(function) -> float:
    module.shifted_dots = function
    gc.collect()
    start = time.perf_counter()
    case.fn()
    return time.perf_counter() - start


for function in sides.values():
    timed(function)
times: dict[str, list[float]] = {name: [] for name in sides}
for _ in range(pairs):
    for name, function in sides.items():
        times[name].append(timed(function))
for name, values in times.items():
    print(f"L={length} {name}: median {statistics.median(values) * 1e3:.1f} ms, "
          f"range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
ratios = [old / new for old, new in zip(*times.values(), strict=True)]
print(f"L={length} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, "
      f"range {min(ratios):.3f}-{max(ratios):.3f}")
