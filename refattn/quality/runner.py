"""``refattn quality``: the command line of the learning benchmark.

    refattn quality --task copy --attention fsat --length 512 --steps 600 --seed 0 --seed 1 --out DIR
    refattn quality --preset committed --out docs/quality/cpu-DATE    # the committed matrix
    refattn quality --preset smoke --out /tmp/q                          # seconds: what CI runs

Every (task, attention, seed) is one run; ``DIR/results.json`` is rewritten after each run (with
``--resume`` the runs already in it are kept and not repeated), and at the end ``DIR/table.md``, the
learning curves and FSAT's pictures are written. Each option is validated first; a bad one is a
usage error (exit status 2) naming the option, what it expects and, for names, the choices.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from refattn import arguments as types

from . import report
from . import tasks as task_module
from .config import ATTENTIONS, AttentionConfig, ModelConfig, TrainConfig
from .tasks import TASKS

__all__ = ["DEFAULT_LENGTHS", "PRESETS", "add_arguments", "run"]

DEFAULT_LENGTHS = {"copy": 512, "listops": 1024, "recall": 512, "planted": 512}
"""The length of each task in the committed matrix (and the default of ``--length``)."""

PRESETS: dict[str, dict[str, Any]] = {
    # The committed results (docs/quality/): every task x attention, one seed, about an hour on one
    # quiet core. Per task: (steps, eval_every); explicit --steps / --eval-every override them. Copy
    # gets 1,000 steps because the dense model needs about 800 for its middle lag (spec/quality.md).
    "committed": {"per_task": {"copy": (1000, 50), "planted": (600, 50), "recall": (600, 50), "listops": (300, 25)},
                  "batch": 8, "eval_size": 64, "seeds": [0], "profile": True},
    # CI: every task x attention at L = 64 for a few steps.
    "smoke": {"steps": 2, "batch": 2, "eval_every": 1, "eval_size": 2, "seeds": [0], "length": 32},
}

FSAT_OPTIONS = ("noise_scale", "noise_schedule", "noise_final", "noise_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn quality``, each validated by its type (:mod:`refattn.arguments`)."""
    positive, above_zero, nonnegative = types.integer(1), types.number(0, open_low=True), types.number(0)
    parser.add_argument("--task", action="append", choices=tuple(TASKS), help="task (repeatable; default: all)")
    parser.add_argument("--attention", action="append", choices=ATTENTIONS,
                        help="attention (repeatable; default: all)")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="budgets of the committed matrix or the CI smoke run")
    parser.add_argument("--length", type=types.integer(16), metavar="L",
                        help=f"sequence length, >= 16: every task needs room for its offsets (default per task: "
                             f"{DEFAULT_LENGTHS})")
    parser.add_argument("--steps", type=positive, help="step budget (default 600; the preset's per task)")
    parser.add_argument("--seconds", type=above_zero, help="training-time budget per run in seconds (default: none)")
    parser.add_argument("--batch", type=positive, help="sequences per step (default 8)")
    parser.add_argument("--seed", action="append", type=types.integer(0), help="seed (repeatable; default 0)")
    parser.add_argument("--lr", type=above_zero, default=3e-3, help="AdamW learning rate after warm-up (default 3e-3)")
    parser.add_argument("--warmup", type=types.integer(0), metavar="STEPS",
                        help="linear learning-rate warm-up in steps (default: a tenth of the step budget)")
    parser.add_argument("--eval-every", type=positive,
                        help="steps between evaluations (default 50; the preset's per task)")
    parser.add_argument("--eval-size", type=positive, help="held-out sequences (default 64)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch intra-op threads (default 1: on a shared machine more threads wait on each other)")
    parser.add_argument("--dim", type=positive, default=ModelConfig.dim, help="model width")
    parser.add_argument("--heads", type=positive, default=ModelConfig.heads)
    parser.add_argument("--depth", type=positive, default=ModelConfig.depth, help="Transformer blocks")
    parser.add_argument("--top-k", type=positive, default=AttentionConfig.top_k, help="FSAT's K")
    parser.add_argument("--local-block", type=positive, default=AttentionConfig.local_block,
                        help="block of the local heads and of the local baseline")
    parser.add_argument("--noise-scale", type=nonnegative, help="FSAT Gumbel temperature at the start (>= 0)")
    parser.add_argument("--noise-schedule", choices=("constant", "linear", "cosine"), help="FSAT temperature schedule")
    parser.add_argument("--noise-final", type=nonnegative, help="FSAT temperature after the schedule (>= 0)")
    parser.add_argument("--noise-steps", type=positive, help="FSAT schedule length in training steps")
    parser.add_argument("--out", default="quality-results", type=types.output_directory, metavar="DIR",
                        help="output directory")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in DIR/results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="record the top operators of one profiled training step (on in --preset committed)")


def _settings(arguments: argparse.Namespace) -> dict[str, Any]:
    """The effective settings: explicit options over the preset over the defaults; raises ValueError for the
    checks that involve several options (each option's own range is checked by its type when it is parsed)."""
    preset = PRESETS.get(arguments.preset or "", {})
    settings: dict[str, Any] = {
        "tasks": arguments.task or list(TASKS),
        "attentions": arguments.attention or list(ATTENTIONS),
        "length": arguments.length if arguments.length is not None else preset.get("length"),
        "steps": arguments.steps if arguments.steps is not None else preset.get("steps", 600),
        "seconds": arguments.seconds,
        "batch": arguments.batch if arguments.batch is not None else preset.get("batch", 8),
        "seeds": arguments.seed or preset.get("seeds", [0]),
        "eval_every": arguments.eval_every if arguments.eval_every is not None else preset.get("eval_every", 50),
        "eval_size": arguments.eval_size if arguments.eval_size is not None else preset.get("eval_size", 64),
        "profile": arguments.profile or preset.get("profile", False),
        "per_task": {task: {"steps": steps, "eval_every": every}
                     for task, (steps, every) in preset.get("per_task", {}).items()},
    }
    if arguments.dim % arguments.heads:
        raise ValueError(f"--dim, --heads: expected the width divisible by the heads, got {arguments.dim} and "
                         f"{arguments.heads}")
    if arguments.heads < 2 and {"routing", "lucidrains"} & set(settings["attentions"]):
        raise ValueError(f"--heads: the routing attentions need at least 2 heads (half of them local), "
                         f"got {arguments.heads}")
    if "lucidrains" in settings["attentions"]:
        try:
            import routing_transformer  # noqa: F401
        except ImportError as error:
            raise ValueError("--attention lucidrains: the peer package routing-transformer 1.6.1 is not installed "
                             f"(pip install 'refattn[peer]'): {error}") from error
    return settings


def _configs(arguments: argparse.Namespace) -> tuple[ModelConfig, AttentionConfig]:
    model = ModelConfig(dim=arguments.dim, heads=arguments.heads, depth=arguments.depth)
    fsat = {name: getattr(arguments, name) for name in FSAT_OPTIONS if getattr(arguments, name) is not None}
    attention = AttentionConfig(top_k=arguments.top_k, local_block=arguments.local_block,
                                fsat_options=tuple(sorted(fsat.items())))
    return model, attention


class _LoadSampler:
    """Samples ``os.getloadavg()`` every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 30.0) -> None:
        self.samples: list[list[float]] = [list(os.getloadavg())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(list(os.getloadavg()))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self.samples.append(list(os.getloadavg()))
        one_minute = [s[0] for s in self.samples]
        return {"min": min(one_minute), "mean": sum(one_minute) / len(one_minute), "max": max(one_minute),
                "samples": len(one_minute)}


def _run_key(run: dict[str, Any]) -> tuple[str, int, str, int]:
    return run["task"]["task"], run["task"]["length"], run["attention"], run["seed"]


def _write_outputs(payload: dict[str, Any], out_dir: Path, plots: bool) -> list[Path]:
    runs = payload["runs"]
    (out_dir / "table.md").write_text(report.table(runs) + "\n")
    (out_dir / "costs.md").write_text(report.cost_table(runs) + "\n")
    if not plots:
        return []
    written = report.curve_plots(runs, out_dir)
    for run in runs:
        if run["attention"] != "fsat":
            continue
        dense = next((r for r in runs if r["attention"] == "dense" and _run_key(r)[:2] == _run_key(run)[:2]
                      and r["seed"] == run["seed"]), None)
        path = report.fsat_plot(run, dense, out_dir)
        if path is not None:
            written.append(path)
    return written


def run(arguments: argparse.Namespace) -> int:
    """The ``refattn quality`` command."""
    from refattn.bench.measure import machine_info

    from .trainer import train

    try:
        settings = _settings(arguments)
    except ValueError as error:
        arguments.parser.error(str(error))
    model_config, attention_config = _configs(arguments)
    out_dir = Path(arguments.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    previous: list[dict[str, Any]] = []
    if arguments.resume and results_path.exists():
        previous = json.loads(results_path.read_text())["runs"]
    done = {_run_key(r) for r in previous}
    started = time.time()
    sampler = _LoadSampler()
    payload: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "settings": settings, "preset": arguments.preset,
        "command": " ".join(["refattn", *getattr(arguments, "command_line", ["quality"])]), "runs": previous,
    }
    base = TrainConfig(steps=settings["steps"], seconds=settings["seconds"], batch=settings["batch"], lr=arguments.lr,
                       warmup=arguments.warmup,
                       eval_every=settings["eval_every"], eval_size=settings["eval_size"], threads=arguments.threads)
    for task_name in settings["tasks"]:
        length = settings["length"] or DEFAULT_LENGTHS[task_name]
        task = task_module.make_task(task_name, length)
        budget = settings["per_task"].get(task_name, {})
        task_config = replace(base, steps=arguments.steps or budget.get("steps", base.steps),
                              eval_every=arguments.eval_every or budget.get("eval_every", base.eval_every))
        for attention in settings["attentions"]:
            for seed in settings["seeds"]:
                if (task_name, length, attention, seed) in done:
                    continue
                record = train(task, attention, model_config, attention_config, replace(task_config, seed=seed),
                               progress=not arguments.no_progress, profile=settings["profile"])
                record["load_average_after"] = list(os.getloadavg())
                payload["runs"].append(record)
                final = record["final"]
                print(f"{task_name:<8} L={length:<5} {attention:<10} seed {seed}: "
                      f"accuracy {final['eval_accuracy']:.3f} "
                      f"after {record['steps']} steps, {record.get('seconds_per_step', float('nan')):.3f} s/step, "
                      f"{record['train_seconds']:.0f} s", flush=True)
                payload["elapsed_s"] = time.time() - started
                results_path.write_text(json.dumps(payload, indent=1))
    payload["load_average"] = sampler.stop()
    payload["elapsed_s"] = time.time() - started
    results_path.write_text(json.dumps(payload, indent=1))
    print(report.table(payload["runs"]))
    for path in _write_outputs(payload, out_dir, plots=not arguments.no_plots):
        print(f"plot: {path}")
    load = payload["load_average"]
    print(f"results: {results_path} ({payload['elapsed_s']:.0f} s; load average {load['min']:.1f}-{load['max']:.1f}, "
          f"mean {load['mean']:.1f})")
    return 0
