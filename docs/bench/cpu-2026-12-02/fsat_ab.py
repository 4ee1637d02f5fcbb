"""Interleaved A/B of a change to the torch FSAT: fwd+bwd (float32, B = 1, H = 8, D = 64, K = 16), the code before
the change against the code after it, in one process (refattn.bench.measure.interleaved_times).

    python docs/bench/cpu-2026-12-02/fsat_ab.py CHANGE LENGTH PAIRS

CHANGE:
- ``spectrum-blocks``: one head's spectra at once (SPECTRUM_BYTES unbounded) against blocks of at most 16 MiB;
- ``shifted-dots``: shifted_dots zeroing the rows without a partner column by column (copied below) against one
  contiguous fill per chunk.
"""

import importlib
import statistics
import sys

import torch

from refattn.bench import cases, measure

estimate = importlib.import_module("refattn.backends.torch.fsat.estimate")
sparse = importlib.import_module("refattn.backends.torch.fsat.sparse_attention")


def column_zeroing(pairs, x, y):
    """shifted_dots before the single fill: sliced shifts only (the benchmark's case)."""
    dots = torch.empty(x.shape[:3] + (len(pairs),), dtype=x.dtype, device=x.device)
    product = None
    for b, h, start, stop, spans in sparse.sliced_chunks(pairs, x.shape, x.shape[3], sparse.CHUNK_ELEMENTS):
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


CHANGES = {  # name: (module, attribute, {side: value})
    "spectrum-blocks": (estimate, "SPECTRUM_BYTES", {"one block per head": 2**62, "16 MiB blocks": 2**24}),
    "shifted-dots": (sparse, "shifted_dots", {"column by column": column_zeroing,
                                              "one fill per chunk": sparse.shifted_dots}),
}


def main() -> None:
    change, length, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    module, attribute, sides = CHANGES[change]
    shape = cases.Shape(1, 8, length, 64, top_k=16)
    case = cases.build_case("torch", "fsat", "fwdbwd", "float32", shape, device="cpu", dense_max_gflop=float("inf"),
                            dense_max_bytes=float("inf"), memory_available=20 * 2**30)

    def call_with(value):
        def call() -> None:
            setattr(module, attribute, value)
            case.fn()

        return call

    times = dict(zip(sides, measure.interleaved_times([call_with(v) for v in sides.values()], pairs), strict=True))
    for name, values in times.items():
        print(f"L={length} {name}: median {statistics.median(values) * 1e3:.1f} ms, "
              f"range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
    ratios = [old / new for old, new in zip(*times.values(), strict=True)]
    print(f"L={length} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
