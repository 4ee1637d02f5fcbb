"""Training-step time of the benchmark's model, dense against FSAT (issue 15's Goal: lower wall time per
step from L = 1,024 on), measured as the brief asks for performance claims: the two sides interleaved in
one process, one training step each per pair, at least 7 pairs after a warm-up pair; the median and the
range of the per-pair ratio dense / FSAT, in wall time and in CPU time (``time.process_time``; with one torch
thread this is the step's own work, which a shared machine's other processes do not inflate).

    .venv/bin/python scripts/quality_step_time.py --length 1024 --length 2048 --pairs 9

The model and batch are those of the committed matrix (width 64, 4 heads, 2 blocks, K = 16, batch 8,
one torch thread), on the ListOps task (padded, not causal) at each length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from refattn.quality.config import AttentionConfig, ModelConfig
from refattn.quality.model import Transformer
from refattn.quality.tasks import make_task


def step_timer(task, attention: str):
    """A function that runs one training step (forward, backward, AdamW) and returns its (wall, CPU) seconds."""
    model = Transformer(task, attention, ModelConfig(), AttentionConfig(), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch = task.sample(8, np.random.default_rng([2, 0]))
    tokens, targets = torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets)
    padding = None if batch.padding is None else torch.from_numpy(batch.padding)

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        logits, aux = model(tokens, padding)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100) + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", action="append", type=int, help="sequence length (repeatable; default 1024)")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved pairs after one warm-up pair")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    for length in arguments.length or [1024]:
        task = make_task("listops", length)
        dense, fsat = step_timer(task, "dense"), step_timer(task, "fsat")
        dense(), fsat()  # warm-up pair, not counted
        load_before = os.getloadavg()[0]
        times = [(dense(), fsat()) for _ in range(arguments.pairs)]
        load_after = os.getloadavg()[0]
        for clock, index in (("wall", 0), ("CPU", 1)):
            ratios = [d[index] / f[index] for d, f in times]
            print(f"L = {length}, {clock} time: dense {statistics.median(d[index] for d, _ in times):.3f} s/step, "
                  f"FSAT {statistics.median(f[index] for _, f in times):.3f} s/step; dense / FSAT median "
                  f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs); "
                  f"load average {load_before:.1f} -> {load_after:.1f}", flush=True)


if __name__ == "__main__":
    main()
