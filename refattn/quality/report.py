"""The benchmark's outputs: the results table, the learning curves and FSAT's learned offsets as PNG.

All functions take the run records of :func:`refattn.quality.trainer.train` (as stored in
``results.json``); matplotlib is imported only by the plotting functions.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refattn import figures

__all__ = ["cost_table", "fsat_plot", "curve_plots", "summarize", "table"]

ORDER = ("dense", "fsat", "routing", "lucidrains", "local")
COLORS = {"dense": "black", "fsat": "tab:red", "routing": "tab:blue", "lucidrains": "tab:cyan", "local": "tab:green"}


def _key(run: dict[str, Any]) -> tuple[str, int, str]:
    return run["task"]["task"], run["task"]["length"], run["attention"]


def _groups(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(_key(run), []).append(run)
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], rank.get(item[0][2], 99))))


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def summarize(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, L, attention): means (and ranges) over the seeds."""
    rows = []
    for (task, length, attention), group in _groups(runs).items():
        finals = [run["final"] for run in group]
        per_target = [statistics.fmean(f["eval_target_accuracy"][t] for f in finals)
                      for t in range(len(finals[0]["eval_target_accuracy"]))]
        rows.append({
            "task": task, "length": length, "attention": attention, "seeds": [run["seed"] for run in group],
            "steps": [run["steps"] for run in group],
            "accuracy": [f["eval_accuracy"] for f in finals],
            "per_target_accuracy": per_target,
            "eval_loss": [f["eval_loss"] for f in finals],
            "seconds_per_step": [run["seconds_per_step"] for run in group if "seconds_per_step" in run],
            "train_seconds": [run["train_seconds"] for run in group],
            "peak_mib": [run["peak_memory_bytes"] / 2**20 for run in group if "peak_memory_bytes" in run],
            "attention_parameters": group[0]["parameters"]["attention"],
            "other_parameters": group[0]["parameters"]["rest"],
        })
    return rows


def table(runs: Iterable[dict[str, Any]]) -> str:
    """A Markdown table: accuracy at the budget (mean [min-max] over seeds), per-target accuracy,
    median seconds per training step, training seconds, peak memory of a step, parameters."""
    header = ("| task | L | attention | seeds | steps | accuracy | per target | s/step | train s | peak MiB "
              "| attn params | other params |")
    lines = [header, "|" + "---|" * 12]
    for row in summarize(runs):
        per_target = row["per_target_accuracy"]
        targets = " ".join(f"{a:.2f}" for a in per_target) if len(per_target) > 1 else ""
        steps = sorted(set(row["steps"]))
        lines.append(
            f"| {row['task']} | {row['length']} | {row['attention']} | {len(row['seeds'])} "
            f"| {'/'.join(str(s) for s in steps)} | {_spread(row['accuracy'], '.3f')} | {targets} "
            f"| {_spread(row['seconds_per_step'], '.2f') if row['seconds_per_step'] else '—'} "
            f"| {_spread(row['train_seconds'], '.0f')} "
            f"| {_spread(row['peak_mib'], '.0f') if row['peak_mib'] else '—'} "
            f"| {row['attention_parameters']:,} | {row['other_parameters']:,} |")
    return "\n".join(lines)


def cost_table(runs: Iterable[dict[str, Any]], top: int = 5) -> str:
    """Where a training step's time goes, per run: the median forward, backward and update seconds,
    and (runs with a profile) the operators with the largest self CPU time, with their share."""
    lines = ["| task | L | attention | seed | forward s | backward s | update s | top operators (self CPU share) |",
             "|" + "---|" * 8]
    for run in sorted(runs, key=lambda r: (*_key(r)[:2], ORDER.index(r["attention"]) if r["attention"] in ORDER
                                           else 99, r["seed"])):
        split = run.get("step_split", {})
        ops = ", ".join(f"{op['name']} {op['share']:.0%} ({op['calls']})" for op in run.get("profile", [])[:top])
        lines.append(f"| {run['task']['task']} | {run['task']['length']} | {run['attention']} | {run['seed']} "
                     f"| {split.get('forward', float('nan')):.3f} | {split.get('backward', float('nan')):.3f} "
                     f"| {split.get('update', float('nan')):.3f} | {ops or '—'} |")
    return "\n".join(lines)


def curve_plots(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per (task, L): accuracy and loss against steps and against training seconds, one colour per
    attention, one line per seed."""
    plt = figures.pyplot()
    written = []
    by_task: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        by_task.setdefault((run["task"]["task"], run["task"]["length"]), []).append(run)
    for (task, length), group in sorted(by_task.items()):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
        labelled: set[str] = set()
        for run in sorted(group, key=lambda r: (ORDER.index(r["attention"]) if r["attention"] in ORDER else 99)):
            attention = run["attention"]
            curve = run["curve"]
            steps = [p["step"] for p in curve]
            seconds = [p["seconds"] for p in curve]
            label = None if attention in labelled else attention
            labelled.add(attention)
            style = dict(color=COLORS.get(attention), label=label, linewidth=1.2, alpha=0.85)
            for row, metric in enumerate(("eval_accuracy", "eval_loss")):
                values = [p[metric] for p in curve]
                axes[row][0].plot(steps, values, **style)
                axes[row][1].plot(seconds, values, **style)
        for row, name in enumerate(("held-out accuracy", "held-out loss")):
            axes[row][0].set_ylabel(name)
        for col, name in enumerate(("training steps", "training seconds (forward + backward + update)")):
            axes[1][col].set_xlabel(name)
        for ax in axes.flat:
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{task}, L = {length}")
        written.append(figures.save(fig, out_dir / f"curves_{task}_{length}.png", dpi=110))
    return written


def fsat_plot(fsat_run: dict[str, Any], dense_run: dict[str, Any] | None, out_dir: Path) -> Path | None:
    """FSAT's learning, for a task with true offsets: (top) the offsets each head selected for the first
    held-out sequence at every evaluation, against the true offsets; (bottom) per layer, the final
    estimated scores s_tau per head next to the dense model's attention averaged by diagonal."""
    curve = fsat_run["curve"]
    if "fsat" not in curve[0]:
        return None
    plt = figures.pyplot()
    task, length = fsat_run["task"]["task"], fsat_run["task"]["length"]
    true_offsets = fsat_run["task"]["true_offsets"]
    span = (-length, 1) if fsat_run["task"]["causal"] else (-length, length)  # the candidate offsets
    layers = len(curve[0]["fsat"]["offsets"])
    heads = len(curve[0]["fsat"]["offsets"][0])
    scores = fsat_run.get("learned", {}).get("fsat_scores")
    diagonal = (dense_run or {}).get("learned", {}).get("dense_diagonal")
    rows = 1 + (1 if scores else 0)
    fig, axes = plt.subplots(rows, layers, figsize=(6 * layers, 4.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for layer in range(layers):
        ax = axes[0][layer]
        for head in range(heads):
            xs, ys = [], []
            for point in curve:
                offsets = [t for t in point["fsat"]["offsets"][layer][head] if t != 0]
                xs += [point["step"]] * len(offsets)
                ys += offsets
            jitter = (head - (heads - 1) / 2) * 0.15 * (curve[-1]["step"] / max(1, len(curve)))
            ax.scatter([x + jitter for x in xs], ys, s=6, color=colors[head % len(colors)], label=f"head {head}")
        for tau in true_offsets:
            ax.axhline(tau, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}: selected offsets (first held-out sequence; dashed: true)")
        ax.set_xlabel("training step")
        ax.set_ylabel("offset tau = j - i")
        ax.set_ylim(*span)
        ax.legend(fontsize=7, markerscale=2)
        if scores:
            ax = axes[1][layer]
            taus = list(range(-(length - 1), length))
            for head in range(heads):
                values = [float("nan") if v is None else v for v in scores[layer][head]]
                ax.plot(taus, values, color=colors[head % len(colors)], linewidth=0.8, label=f"FSAT s, head {head}")
            ax.set_ylabel("FSAT estimated score s_tau")
            if diagonal:
                twin = ax.twinx()
                for head in range(len(diagonal[layer])):
                    twin.plot(taus, diagonal[layer][head], color="gray", linewidth=0.8, alpha=0.7,
                              label="dense: attention by diagonal" if head == 0 else None)
                twin.set_ylabel("dense model: mean attention on diagonal tau")
                twin.legend(fontsize=7, loc="upper right")
            for tau in true_offsets:
                ax.axvline(tau, color="black", linestyle="--", linewidth=0.8)
            ax.set_xlabel("offset tau = j - i")
            ax.set_xlim(*span)
            ax.set_title(f"layer {layer}: after training (mean over held-out sequences)")
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"FSAT on {task}, L = {length}, seed {fsat_run['seed']}")
    return figures.save(fig, out_dir / f"fsat_{task}_{length}_seed{fsat_run['seed']}.png", dpi=110)
