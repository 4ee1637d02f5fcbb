"""FSAT discovers a far lag (issue 15): in the multi-target copy task at L = 128 (lags 4, 16 and 48; 48 >=
L/4), an FSAT model with the layer's default exploration learns the lag-48 target, and some head selects
tau = -48 for every held-out sequence in eval mode (no noise), within the stated step budget, for
each of the seeds 0, 1 and 2.

The model is the benchmark's Transformer, small enough for CI on two shared cores: width 32, 4 heads,
one block, K = 8, batch 8, learning rate 3e-3. Each seed stops at its first evaluation (every 20
steps) where the lag-48 accuracy is at least 0.9 and tau = -48 is selected; the printed lines give the
step and the seconds it took.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from refattn.quality.config import AttentionConfig, ModelConfig, TrainConfig  # noqa: E402
from refattn.quality.tasks import Copy  # noqa: E402
from refattn.quality.trainer import train  # noqa: E402

LENGTH = 128
STEP_BUDGET = 1000
FAR = 48


def discovered(point: dict) -> bool:
    """The far target is solved and one head selects tau = -48 for every held-out sequence."""
    hits = point["fsat"]["hits"][0]  # layer 0: [head][target]
    return point["eval_target_accuracy"][2] >= 0.9 and max(head[2] for head in hits) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fsat_discovers_a_far_lag(seed):
    task = Copy(LENGTH)
    assert task.lags == (4, 16, FAR) and FAR >= LENGTH / 4
    start = time.perf_counter()
    run = train(task, "fsat", ModelConfig(dim=32, heads=4, depth=1), AttentionConfig(top_k=8),
                TrainConfig(steps=STEP_BUDGET, batch=8, lr=3e-3, warmup=20, eval_every=20, eval_size=32, seed=seed),
                analyse=False, until=discovered)
    elapsed = time.perf_counter() - start
    final = run["final"]
    accuracy = [round(a, 3) for a in final["eval_target_accuracy"]]
    print(f"seed {seed}: lag {FAR} {'discovered' if run['stopped_by'] == 'until' else 'NOT discovered'} after "
          f"{run['steps']} steps ({elapsed:.1f} s); accuracy per lag {accuracy}; "
          f"eval offsets of heads 0..3: {final['fsat']['offsets'][0]}")
    assert run["stopped_by"] == "until", f"lag {FAR} not discovered within {STEP_BUDGET} steps: {final}"
