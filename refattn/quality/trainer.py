"""Train one (task, attention, seed) under a step budget and a time budget; evaluate on held-out data.

The result is a JSON-ready dict (:func:`train`): the configuration, the parameter counts, the
learning curve (one point per evaluation: step, training seconds, train and held-out loss and
accuracy; for FSAT the offsets each head selected), the cost (median seconds per step split into
forward, backward and update; peak memory of a step; the top operators of a profiled step) and, for
the attentions whose pattern can be read off, what they learned (see :mod:`.analysis`).

Seconds are *training* seconds: forward, backward and optimizer update, timed with
``time.perf_counter``; data generation and evaluation are timed separately and not counted, so
the time budget and the curves against seconds measure the models, not the data pipeline.
Randomness: the training batches come from ``numpy.random.default_rng([0, seed])`` (the same
batches for every attention at one seed), the held-out set from ``default_rng([1, 0])`` (the same for
every seed); the model from ``seed`` (see :class:`.model.Transformer`).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from refattn.bench.measure import peak_torch_cpu

from . import analysis
from .attentions import DenseAttention
from .config import AttentionConfig, ModelConfig, TrainConfig
from .model import Transformer, parameter_counts
from .tasks import IGNORE, Batch, Task

__all__ = ["evaluate", "train"]


def _tensors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    padding = None if batch.padding is None else torch.from_numpy(batch.padding)
    return torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets), padding


def _loss_and_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the targets, and per target column (correct, counted) sums."""
    classes = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1), ignore_index=IGNORE)
    valid = targets != IGNORE
    correct = (logits.argmax(-1) == targets) & valid
    if targets.dim() == 1:  # one label per sequence
        return loss, correct.sum().reshape(1), valid.sum().reshape(1)
    return loss, correct.sum(dim=(0, 1)), valid.sum(dim=(0, 1))


@torch.no_grad()
def evaluate(model: Transformer, batches: list[Batch], true_offsets: tuple[int, ...] = ()) -> dict[str, Any]:
    """Held-out loss (mean over targets) and accuracy (overall and per target column) in eval mode.

    With FSAT layers also ``fsat``: ``offsets`` [layer][head], the offsets selected for the first
    held-out sequence, and (given ``true_offsets``) ``hits`` [layer][head][t], the fraction of held-out
    sequences for which the head selected true_offsets[t].
    """
    was_training = model.training
    model.eval()
    total_loss = total_count = 0.0
    correct = counted = None
    fsat_layers = [layer for layer in model.attention_layers if hasattr(layer, "last_offsets")]
    selected: list[list[torch.Tensor]] = [[] for _ in fsat_layers]
    for batch in batches:
        tokens, targets, padding = _tensors(batch)
        logits, _ = model(tokens, padding)
        for offsets, layer in zip(selected, fsat_layers, strict=True):
            offsets.append(layer.last_offsets)
        loss, hits, count = _loss_and_hits(logits, targets)
        total_loss += float(loss) * float(count.sum())
        total_count += float(count.sum())
        correct = hits if correct is None else correct + hits
        counted = count if counted is None else counted + count
    model.train(was_training)
    per_target = (correct.double() / counted.clamp_min(1).double()).tolist()
    result: dict[str, Any] = {"eval_loss": total_loss / max(total_count, 1.0),
                              "eval_accuracy": float(correct.sum()) / max(float(counted.sum()), 1.0),
                              "eval_target_accuracy": per_target}
    if fsat_layers:
        offsets = [torch.cat(parts) for parts in selected]
        result["fsat"] = {"offsets": [layer_offsets[0].tolist() for layer_offsets in offsets]}
        if true_offsets:
            result["fsat"]["hits"] = [analysis.offset_hits(layer_offsets, true_offsets) for layer_offsets in offsets]
    return result


def _learned_pattern(model: Transformer, task: Task, batch: Batch) -> dict[str, Any]:
    """FSAT: mean s_tau per layer and head; dense: attention averaged by diagonal; our routing: the
    true keys' cluster coverage (tasks with true offsets)."""
    tokens, _, padding = _tensors(batch)
    model.eval()
    inputs = analysis.attention_inputs(model, tokens, padding)
    found: dict[str, Any] = {}
    layers = model.attention_layers
    if model.attention_name == "fsat":
        found["fsat_scores"] = [_rounded(analysis.fsat_scores(layer, x, padding).mean(dim=0))
                                for layer, x in zip(layers, inputs, strict=True)]
    elif model.attention_name == "dense":
        found["dense_diagonal"] = [_rounded(analysis.dense_diagonal_profile(layer, x, padding))
                                   for layer, x in zip(layers, inputs, strict=True)
                                   if isinstance(layer, DenseAttention)]
    elif model.attention_name == "routing" and task.true_offsets:
        found["routing_coverage"] = [analysis.routing_coverage(layer, x, padding, task.true_offsets)
                                     for layer, x in zip(layers, inputs, strict=True)]
    return found


def _rounded(values: torch.Tensor) -> list:
    """Nested lists with 4 significant digits (keeps the JSON small); -inf becomes None."""
    array = values.detach().double().cpu().numpy()
    return [[None if not np.isfinite(v) else float(f"{v:.4g}") for v in row] for row in array]


def _profile(step: Any, rows: int = 12) -> list[dict[str, Any]]:
    """The operators of one call of ``step`` with the largest self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in averages[:rows]]


def _bar(total: int, enabled: bool, label: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)


def train(task: Task, attention: str, model_config: ModelConfig | None = None,
          attention_config: AttentionConfig | None = None, config: TrainConfig | None = None,
          *, progress: bool = False, analyse: bool = True, profile: bool = False,
          until: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train and evaluate one model; returns the run's record (see the module docstring).

    ``analyse``: also record what the attention learned and the peak memory of a step; ``profile``:
    also the top operators of a profiled step (about two seconds of the profiler's own bookkeeping);
    ``until``: stop early at the first evaluation point for which ``until(point)`` is true.
    """
    model_config = model_config or ModelConfig()
    attention_config = attention_config or AttentionConfig()
    config = config or TrainConfig()
    torch.set_num_threads(config.threads)
    model = Transformer(task, attention, model_config, attention_config, seed=config.seed)
    model.train()
    counts = parameter_counts(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    train_rng = np.random.default_rng([0, config.seed])
    eval_rng = np.random.default_rng([1, 0])
    eval_batches = [task.sample(min(config.batch, config.eval_size - start), eval_rng)
                    for start in range(0, config.eval_size, config.batch)]

    def step(batch: Batch) -> tuple[float, float, float, float]:
        tokens, targets, padding = _tensors(batch)
        start = time.perf_counter()
        logits, aux = model(tokens, padding)
        loss, _, _ = _loss_and_hits(logits, targets)
        total = loss + aux
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        schedule.step()
        end = time.perf_counter()
        return float(loss.detach()), forward - start, backward - forward, end - backward

    curve: list[dict[str, Any]] = []
    times: list[tuple[float, float, float]] = []
    train_seconds = data_seconds = eval_seconds = 0.0
    losses: list[float] = []

    def record(steps_done: int) -> None:
        nonlocal eval_seconds
        start = time.perf_counter()
        point = {"step": steps_done, "seconds": train_seconds,
                 "train_loss": statistics.fmean(losses) if losses else None,
                 **evaluate(model, eval_batches, task.true_offsets)}
        curve.append(point)
        losses.clear()
        eval_seconds += time.perf_counter() - start

    bar = _bar(config.steps, progress, f"{task.name}/{attention}")
    record(0)
    stopped_by = "steps"
    steps_done = 0
    while steps_done < config.steps:
        if config.seconds is not None and train_seconds >= config.seconds:
            stopped_by = "seconds"
            break
        start = time.perf_counter()
        batch = task.sample(config.batch, train_rng)
        data_seconds += time.perf_counter() - start
        loss, forward, backward, update = step(batch)
        times.append((forward, backward, update))
        train_seconds += forward + backward + update
        losses.append(loss)
        steps_done += 1
        if steps_done % config.eval_every == 0 or steps_done == config.steps:
            record(steps_done)
            if bar is not None:
                bar.set_postfix(loss=f"{curve[-1]['eval_loss']:.3f}", acc=f"{curve[-1]['eval_accuracy']:.3f}")
            if until is not None and until(curve[-1]):
                stopped_by = "until"
                break
        if bar is not None:
            bar.update(1)
    if curve[-1]["step"] != steps_done:
        record(steps_done)
    if bar is not None:
        bar.close()

    result: dict[str, Any] = {
        "task": task.describe(), "attention": attention, "seed": config.seed, "model": asdict(model_config),
        "attention_config": {**asdict(attention_config), "fsat_options": dict(attention_config.fsat_options)},
        "train": {**asdict(config), "warmup": config.warmup_steps},
        "layer": model.attention_layers[0].extra_repr(), "parameters": counts,
        "curve": curve, "final": curve[-1], "steps": steps_done,
        "stopped_by": stopped_by, "train_seconds": train_seconds, "data_seconds": data_seconds,
        "eval_seconds": eval_seconds,
    }
    if times:
        result["seconds_per_step"] = statistics.median(sum(t) for t in times)
        result["step_split"] = {part: statistics.median(t[i] for t in times)
                                for i, part in enumerate(("forward", "backward", "update"))}
    if analyse:
        result["learned"] = _learned_pattern(model, task, eval_batches[0])
        # cost probes last: they take optimizer steps, after the final evaluation
        model.train()
        probe = task.sample(config.batch, np.random.default_rng([2, config.seed]))
        result["peak_memory_bytes"] = peak_torch_cpu(lambda: step(probe))
    if profile:
        model.train()
        probe = task.sample(config.batch, np.random.default_rng([2, config.seed]))
        result["profile"] = _profile(lambda: step(probe))
    return result
