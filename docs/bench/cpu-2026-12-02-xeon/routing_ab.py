"""Interleaved A/B of a change to the torch routing: fwd+bwd (float32, B = 1, H = 8, D = 64, lucidrains profile,
C = W as the targets take them), the code before the change against the code after it, in one process
(refattn.bench.measure.interleaved_times).

    python docs/bench/cpu-2026-12-02-xeon/routing_ab.py CHANGE LENGTH CLUSTERS PAIRS

CHANGE:
- ``route-by-groups``: route_rows with one ``torch.topk`` over each row of L similarities and a sort of the W
  indices (copied below) against the selection over groups of scores (top_window_by_groups).
"""

import importlib
import statistics
import sys

import torch

from refattn.bench import cases, measure

route = importlib.import_module("refattn.backends.torch.routing.route")


def one_topk(scores, window, padded):
    """route_rows before the two-stage threshold."""
    if padded is not None:
        scores = scores.masked_fill(padded, float("-inf"))
    top = torch.topk(scores, window, dim=-1, sorted=False)
    threshold = top.values.amin(dim=-1, keepdim=True)
    exactly_window = torch.count_nonzero(scores >= threshold) == threshold.numel() * window
    if bool(exactly_window & torch.isfinite(threshold).all()):
        return torch.sort(top.indices, dim=-1).values
    return route.route_rows_with_ties(scores, window, threshold, padded)


CHANGES = {  # name: (module, attribute, {side: value})
    "route-by-groups": (route, "route_rows", {"one topk over L": one_topk, "selection over groups": route.route_rows}),
}


def main() -> None:
    change, length, clusters, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    module, attribute, sides = CHANGES[change]
    shape = cases.Shape(1, 8, length, 64, clusters=clusters, window=clusters)
    case = cases.build_case("torch", "routing", "fwdbwd", "float32", shape, device="cpu")

    def call_with(value):
        def call() -> None:
            setattr(module, attribute, value)
            case.fn()

        return call

    ticks = measure.cpu_ticks()
    times = dict(zip(sides, measure.interleaved_times([call_with(v) for v in sides.values()], pairs), strict=True))
    stolen = measure.stolen_share(ticks, measure.cpu_ticks())
    for name, values in times.items():
        print(f"L={length} C=W={clusters} {name}: median {statistics.median(values) * 1e3:.1f} ms, "
              f"range {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}")
    ratios = [old / new for old, new in zip(*times.values(), strict=True)]
    print(f"L={length} C=W={clusters} ratio old/new over {pairs} pairs: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}; CPU time stolen by the hypervisor: "
          + ("unknown" if stolen is None else f"{stolen:.0%}"))


if __name__ == "__main__":
    main()
