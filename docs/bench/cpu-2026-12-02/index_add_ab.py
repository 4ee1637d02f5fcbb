"""Routing fwd+bwd with the gradient rows added back by index_put_(accumulate=True) (the previous code) and by
index_add_ (this commit's CPU path), interleaved in one process; the gradients must be bitwise equal.

    python docs/bench/cpu-2026-12-02/index_add_ab.py LENGTH CLUSTERS PAIRS
"""

import gc
import importlib
import os
import statistics
import sys
import time

import torch

from refattn.bench import cases

attention = importlib.import_module("refattn.backends.torch.routing.cluster_attention")
WAYS = {"index_put_": lambda out, rows, values: out.index_put_((rows,), values, accumulate=True),
        "index_add_": attention.add_rows_into}


def main() -> None:
    length, clusters, pairs = (int(x) for x in sys.argv[1:4])
    shape = cases.Shape(batch=1, heads=8, length=length, dim=64, clusters=clusters, window=clusters)
    case = cases.build_case("torch", "routing", "fwdbwd", "float32", shape)
    grads = {}
    for name, way in WAYS.items():
        attention.add_rows_into = way
        grads[name] = [g.clone() for g in case.fn()]
    print("bitwise equal:", all(torch.equal(a, b) for a, b in zip(*grads.values(), strict=True)))
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for i in range(pairs):
        for name in list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]:
            attention.add_rows_into = WAYS[name]
            gc.collect()
            start = time.perf_counter()
            case.fn()
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["index_put_"], times["index_add_"], strict=True)]
    for name, values in times.items():
        low, median, high = (1e3 * x for x in (min(values), statistics.median(values), max(values)))
        print(f"{name}: median {median:.1f} ms ({low:.1f}-{high:.1f})")
    print(f"L={length} C=W={clusters} {pairs} pairs, {torch.get_num_threads()} threads: index_put_ / index_add_ "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
