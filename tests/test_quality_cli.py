"""``refattn quality``: usage errors (exit status 2, the option named, the choices listed), the smoke
mode that CI runs (every task x attention for two steps), and the trainer's budgets and evaluation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from refattn import cli

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("argv, message", [
    (["--task", "sort"], "argument --task: invalid choice: sort (choose from copy, listops, recall, planted)"),
    (["--attention", "linear"],
     "argument --attention: invalid choice: linear (choose from dense, fsat, routing, lucidrains, local)"),
    (["--preset", "huge"], "argument --preset: invalid choice: huge (choose from committed, smoke)"),
    (["--noise-schedule", "step"], "argument --noise-schedule: invalid choice: step (choose from constant, linear"),
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["--batch", "-2"], "--batch: expected an integer >= 1, got -2"),
    (["--length", "8"], "--length: expected an integer >= 16"),
    (["--seconds", "nan"], "--seconds: expected a finite number > 0, got nan"),
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    (["--noise-scale", "-1"], "--noise-scale: expected a finite number >= 0, got -1"),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    (["--dim", "30"], "--dim, --heads: expected the width divisible by the heads, got 30 and 4"),
    (["--steps", "ten"], "argument --steps: expected an integer >= 1, got ten"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
])
def test_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quality", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting the choices
    assert message in err, err
    assert "usage: refattn quality" in err
    assert not (tmp_path / "results.json").exists()


def test_missing_peer_is_a_usage_error(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "routing_transformer", None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quality", "--attention", "lucidrains", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "pip install 'refattn[peer]'" in capsys.readouterr().err


def test_smoke_mode(tmp_path, capsys):
    """What CI runs: every task x attention at L = 32 for two steps, with the table, curves and FSAT's
    pictures; the numbers in results.json are consistent with the settings."""
    try:
        import routing_transformer  # noqa: F401

        attentions = 5
    except ImportError:
        print("routing_transformer is not installed: the smoke run leaves out 'lucidrains'")
        attentions = 4
    argv = ["quality", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]
    if attentions == 4:
        for name in ("dense", "fsat", "routing", "local"):
            argv += ["--attention", name]
    start = time.perf_counter()
    assert cli.main(argv) == 0
    elapsed = time.perf_counter() - start
    print(f"smoke mode: {elapsed:.1f} s")
    payload = json.loads((tmp_path / "results.json").read_text())
    runs = payload["runs"]
    assert len(runs) == 4 * attentions
    assert payload["settings"]["steps"] == 2 and payload["machine"]["cpu_count"] >= 1
    assert payload["command"] == "refattn " + " ".join(argv)  # the regeneration command, as typed
    for run in runs:
        assert run["steps"] == 2 and run["stopped_by"] == "steps" and run["task"]["length"] == 32
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert 0.0 <= run["final"]["eval_accuracy"] <= 1.0 and np.isfinite(run["final"]["eval_loss"])
        assert run["seconds_per_step"] > 0 and run["peak_memory_bytes"] > 0
    for task in ("copy", "listops", "recall", "planted"):
        rest = {r["parameters"]["rest"] for r in runs if r["task"]["task"] == task}
        assert len(rest) == 1  # the same model around every attention
        fsat = next(r for r in runs if r["task"]["task"] == task and r["attention"] == "fsat")
        assert len(fsat["learned"]["fsat_scores"]) == 2 and len(fsat["learned"]["fsat_scores"][0][0]) == 63
        assert (tmp_path / f"curves_{task}_32.png").stat().st_size > 10_000
        assert (tmp_path / f"fsat_{task}_32_seed0.png").stat().st_size > 10_000
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 2 + 4 * attentions and table[0].startswith("| task | L | attention |")
    out = capsys.readouterr().out
    assert "results:" in out and "load average" in out


def test_time_budget_and_evaluation():
    from refattn.quality.config import ModelConfig, TrainConfig
    from refattn.quality.model import Transformer
    from refattn.quality.tasks import make_task
    from refattn.quality.trainer import evaluate, train

    task = make_task("copy", 32)
    small = ModelConfig(dim=16, heads=2, depth=1)
    run = train(task, "dense", small, config=TrainConfig(steps=50, seconds=1e-9, batch=2, eval_every=10, eval_size=2),
                analyse=False)
    assert run["steps"] == 1 and run["stopped_by"] == "seconds" and [p["step"] for p in run["curve"]] == [0, 1]
    # evaluate() against an explicit count of correct argmax predictions
    model = Transformer(task, "dense", small, seed=4)
    batches = [task.sample(3, np.random.default_rng(s)) for s in (0, 1)]
    result = evaluate(model, batches)
    correct = np.zeros(3)
    counted = np.zeros(3)
    for batch in batches:
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(batch.tokens))
        predicted = logits.argmax(-1).numpy()
        valid = batch.targets != -100
        correct += ((predicted == batch.targets) & valid).sum(axis=(0, 1))
        counted += valid.sum(axis=(0, 1))
    assert result["eval_target_accuracy"] == pytest.approx((correct / counted).tolist(), abs=1e-12)
    assert result["eval_accuracy"] == pytest.approx(correct.sum() / counted.sum(), abs=1e-12)


@pytest.mark.parametrize("steps, warmup, expected", [(600, None, 60), (200, None, 20), (5, None, 1), (200, 7, 7),
                                                     (200, 0, 0)])
def test_warmup_is_a_tenth_of_the_budget_unless_given(steps, warmup, expected):
    """A short budget (ListOps' 200 steps) is not all warm-up: the default warm-up is a tenth of it."""
    from refattn.quality.config import TrainConfig

    assert TrainConfig(steps=steps, warmup=warmup).warmup_steps == expected


def test_record_states_the_warmup_used():
    """results.json records the warm-up in steps that the run used, not the unset option."""
    from refattn.quality.config import ModelConfig, TrainConfig
    from refattn.quality.tasks import make_task
    from refattn.quality.trainer import train

    run = train(make_task("copy", 32), "dense", ModelConfig(dim=16, heads=2, depth=1),
                config=TrainConfig(steps=20, batch=2, eval_every=20, eval_size=2), analyse=False)
    assert run["train"]["warmup"] == 2 and run["train"]["lr"] == 3e-3
