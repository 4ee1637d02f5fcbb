"""Interleaved A/B: FSAT fwd+bwd (torch, float32, B=1, H=8, D=64, K=16) with one head's spectra at once
(SPECTRUM_BYTES unbounded: the previous behaviour) against blocks of at most 16 MiB."""
import gc, importlib, statistics, sys, time, torch
from refattn.bench import cases
est = importlib.import_module("refattn.backends.torch.fsat.estimate")
L, pairs = int(sys.argv[1]), int(sys.argv[2])
c = cases.build_case("torch", "fsat", "fwdbwd", "float32", cases.Shape(1, 8, L, 64, top_k=16), device="cpu",
                     dense_max_gflop=float("inf"), dense_max_bytes=float("inf"), memory_available=20 * 2**30)
sides = {"one block per head": 2**62, "16 MiB blocks": 2**24}
def timed(limit):
    est.SPECTRUM_BYTES = limit
    gc.collect(); t = time.perf_counter(); c.fn(); return time.perf_counter() - t
for limit in sides.values(): timed(limit)
times = {name: [] for name in sides}
for _ in range(pairs):
    for name, limit in sides.items():
        times[name].append(timed(limit))
for name, ts in times.items():
    print(f"L={L} {name}: median {statistics.median(ts)*1e3:.1f} ms, range {min(ts)*1e3:.1f}-{max(ts)*1e3:.1f}")
ratios = [a / b for a, b in zip(*times.values())]
print(f"L={L} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
