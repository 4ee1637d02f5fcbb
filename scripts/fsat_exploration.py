"""The FSAT exploration sweep behind spec/fsat.md, "Exploration" (issue 15).

The far-lag copy task of tests/test_quality_far_lag.py: L = 128, lags 4, 16 and 48; the benchmark's
Transformer with width 32, 4 heads (head width 8), one block, K = 8; batch 8, learning rate 3e-3 after
20 warm-up steps, 800 steps, evaluation every 20 steps on 32 held-out sequences. One run per (cross
inputs, Gumbel temperature schedule, seed), and the dense model for reference. Each run prints, and
appends to the JSON-lines file ``--out``, the first evaluated step at which each lag's held-out
accuracy reaches 0.9 (None: never within the budget), the final accuracies and, for FSAT, for how
many held-out sequences each head selects each true offset in eval mode.

    .venv/bin/python scripts/fsat_exploration.py --seed 0 --seed 1 --out sweep.jsonl
    .venv/bin/python scripts/fsat_exploration.py --seed 2 --config head/T=0.1 --config qk/T=0.1

A run takes about a minute of one CPU core (800 FSAT steps at 0.05 to 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from refattn.quality.config import AttentionConfig, ModelConfig, TrainConfig
from refattn.quality.tasks import Copy
from refattn.quality.trainer import train

COSINE = {"noise_scale": 1.0, "noise_schedule": "cosine", "noise_final": 0.0, "noise_steps": 400}
CROSS = {"qk": None, "head": 8, "wide": 32}  # None: q and k; 8 = the head width ('head'); 32 = the model width
SCHEDULES = {"T=0.1": {"noise_scale": 0.1}, "T=0.3": {"noise_scale": 0.3}, "T=1": {"noise_scale": 1.0},
             "T=3": {"noise_scale": 3.0}, "cosine": COSINE}
CONFIGS: dict[str, dict[str, Any] | None] = {
    **{f"{cross}/{schedule}": {"cross_dim": dim, **options}
       for cross, dim in CROSS.items() for schedule, options in SCHEDULES.items()},
    "dense": None,
}
"""The grid: name -> FSATAttention options (None: the dense model)."""


def run(name: str, seed: int) -> dict[str, Any]:
    """One run of the sweep; the record written to ``--out``."""
    options = CONFIGS[name]
    task = Copy(128)
    attention = AttentionConfig(top_k=8, fsat_options=tuple((options or {}).items()))
    config = TrainConfig(steps=800, batch=8, lr=3e-3, warmup=20, eval_every=20, eval_size=32, seed=seed)
    result = train(task, "dense" if options is None else "fsat", ModelConfig(dim=32, heads=4, depth=1), attention,
                   config, analyse=False)
    first: list[int | None] = []
    for target in range(len(task.lags)):
        reached = [p["step"] for p in result["curve"] if p["eval_target_accuracy"][target] >= 0.9]
        first.append(reached[0] if reached else None)
    final = result["final"]
    return {"config": name, "fsat_options": options, "seed": seed, "lags": list(task.lags), "first_at_0.9": first,
            "final": [round(a, 4) for a in final["eval_target_accuracy"]],
            "hits": final.get("fsat", {}).get("hits"), "seconds_per_step": result["seconds_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="append", type=int, help="seed (repeatable; default 0)")
    parser.add_argument("--config", action="append", choices=tuple(CONFIGS),
                        help="grid point (repeatable; default all)")
    parser.add_argument("--out", default="fsat-exploration.jsonl", help="JSON-lines file the records are appended to")
    arguments = parser.parse_args()
    for seed in arguments.seed or [0]:
        for name in arguments.config or CONFIGS:
            start = time.perf_counter()
            record = run(name, seed)
            with open(arguments.out, "a") as out:
                out.write(json.dumps(record) + "\n")
            print(f"{name:<12} seed {seed}: lag {record['lags']} first >= 0.9 at {record['first_at_0.9']}, "
                  f"final {record['final']} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
