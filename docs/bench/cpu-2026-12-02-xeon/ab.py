"""Interleaved A/B of a change to the torch backend, the code before the change against the code after it, in one
process (refattn.bench.measure.interleaved_times), float32, H = 8, D = 64; routing with the lucidrains profile and
C = W as the targets take them (64 up to L = 4,096, else 128), FSAT with K = 16.

    python docs/bench/cpu-2026-12-02-xeon/ab.py CHANGE BATCH LENGTH PAIRS [DIRECTION]

DIRECTION: fwdbwd (default) or fwd. CHANGE:
- ``route-by-groups`` (routing): route_rows with one ``torch.topk`` over each row of L similarities and a sort of
  the W indices (copied below) against the selection over groups of scores (top_window_by_groups);
- ``chunk-weights`` (routing): the cluster attention in chunks of at most 2^22 attention weights (16 MiB in
  float32) against 2^19 (2 MiB), clusters at a time (whole (batch, head) pairs before: the same chunks at
  these two shapes for 2^22);
- ``sliced-views`` (FSAT): shifted_dots and the weighted sums taking their (batch, head) views for every offset
  (copied below) against once per chunk of rows.
"""

import importlib
import statistics
import sys

import torch

from refattn.bench import cases, measure

route = importlib.import_module("refattn.backends.torch.routing.route")
cluster = importlib.import_module("refattn.backends.torch.routing.cluster_attention")
sparse = importlib.import_module("refattn.backends.torch.fsat.sparse_attention")


def one_topk(scores, window, padded):
    """route_rows before the selection over groups."""
    if padded is not None:
        scores = scores.masked_fill(padded, float("-inf"))
    top = torch.topk(scores, window, dim=-1, sorted=False)
    threshold = top.values.amin(dim=-1, keepdim=True)
    exactly_window = torch.count_nonzero(scores >= threshold) == threshold.numel() * window
    if bool(exactly_window & torch.isfinite(threshold).all()):
        return torch.sort(top.indices, dim=-1).values
    return route.route_rows_with_ties(scores, window, threshold, padded)


def shifted_dots_views_per_offset(pairs, x, y):
    """shifted_dots before the views were taken once per chunk (sliced shifts only: the benchmark's case)."""
    rows = min(x.shape[2], max(1, sparse.CHUNK_ELEMENTS // x.shape[3]))  # the first chunk's rows, as before
    dots, product = x.new_empty(x.shape[:3] + (len(pairs),)), x.new_empty(rows, x.shape[3])
    for b, h, start, stop, spans in sparse.sliced_chunks(pairs, x.shape, x.shape[3], sparse.CHUNK_ELEMENTS):
        block = dots[b, h, start:stop]
        if any(first > start or end < stop for first, end, _ in spans):
            block.zero_()
        for m, (first, end, tau) in enumerate(spans):
            low, high = max(start, first), min(stop, end)
            if low >= high:
                continue
            chunk = product[: high - low]
            torch.mul(x[b, h, low:high], y[b, h, low + tau : high + tau], out=chunk)
            torch.sum(chunk, dim=-1, out=block[low - start : high - start, m])
    return dots


def weighted_sum_views_per_offset(pairs, weight, source, to_partner):
    """_weighted_sum before the views were taken once per chunk (sliced shifts only)."""
    target = torch.empty(weight.shape[:3] + (source.shape[3],), dtype=source.dtype, device=source.device)
    for b, h, start, stop, spans in sparse.sliced_chunks(pairs, target.shape, target.shape[3],
                                                         sparse.SUM_CHUNK_ELEMENTS):
        chunk = target[b, h, start:stop].zero_()
        for m, (first, end, tau) in enumerate(spans):
            if to_partner:
                low, high = max(start, first + tau), min(stop, end + tau)
                weight_rows = source_rows = slice(low - tau, high - tau)
            else:
                low, high = max(start, first), min(stop, end)
                weight_rows, source_rows = slice(low, high), slice(low + tau, high + tau)
            if low < high:
                terms = weight[b, h, weight_rows, m, None], source[b, h, source_rows]
                chunk[low - start : high - start].addcmul_(*terms)
    return target


CHANGES = {  # name: (algorithm, module, {side: {attribute: value}})
    "route-by-groups": ("routing", route, {"one topk over L": {"route_rows": one_topk},
                                           "selection over groups": {"route_rows": route.route_rows}}),
    "chunk-weights": ("routing", cluster, {"chunks of 2^22 weights": {"CHUNK_WEIGHTS": 2**22},
                                           "chunks of 2^19 weights": {"CHUNK_WEIGHTS": 2**19}}),
    "sliced-views": ("fsat", sparse, {
        "views per offset": {"shifted_dots": shifted_dots_views_per_offset,
                             "_weighted_sum": weighted_sum_views_per_offset},
        "views per chunk": {"shifted_dots": sparse.shifted_dots, "_weighted_sum": sparse._weighted_sum}}),
}


def main() -> None:
    change, batch, length, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    direction = sys.argv[5] if len(sys.argv) > 5 else "fwdbwd"
    algorithm, module, sides = CHANGES[change]
    clusters = 64 if length <= 4096 else 128
    shape = (cases.Shape(batch, 8, length, 64, clusters=clusters, window=clusters) if algorithm == "routing"
             else cases.Shape(batch, 8, length, 64, top_k=16))
    case = cases.build_case("torch", algorithm, direction, "float32", shape, device="cpu")

    def call_with(values):
        def call() -> None:
            for attribute, value in values.items():
                setattr(module, attribute, value)
            case.fn()

        return call

    ticks = measure.cpu_ticks()
    times = dict(zip(sides, measure.interleaved_times([call_with(v) for v in sides.values()], pairs), strict=True))
    stolen = measure.stolen_share(ticks, measure.cpu_ticks())
    what = f"{algorithm} {direction} B={batch} L={length}" + (f" C=W={clusters}" if algorithm == "routing" else "")
    for name, values in times.items():
        print(f"{what} {name}: median {statistics.median(values) * 1e3:.1f} ms, "
              f"range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
    ratios = [old / new for old, new in zip(*times.values(), strict=True)]
    print(f"{what} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}; CPU time stolen by the hypervisor: "
          + ("unknown" if stolen is None else f"{stolen:.0%}"))


if __name__ == "__main__":
    main()
