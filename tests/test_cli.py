"""The ``refattn`` command: top-level help and version, and every ``refattn bench`` option validated before
anything runs (usage error, exit status 2, the option named, what it expects, the choices)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

import refattn
from refattn import arguments, cli


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"refattn {refattn.__version__}"


def test_top_level_help_has_no_restructuredtext(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    assert "--version" in text and "bench" in text and "conformance" in text


BAD_BENCH_OPTIONS = [
    (["--length", "0"], "argument --length: expected an integer >= 1, got 0"),
    (["--length", "-5"], "argument --length: expected an integer >= 1, got -5"),
    (["--length", "1e3"], "argument --length: expected an integer >= 1, got '1e3'"),
    (["--backend", "bogus"], "argument --backend: unknown backend 'bogus'; choose from numpy, torch, cupy, numba_cuda, "
                             "lucidrains"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from float64, float32, bfloat16, "
                            "float16)"),
    (["--algorithm", "linear"], "argument --algorithm: invalid choice: 'linear' (choose from fsat, routing, dense)"),
    (["--direction", "up"], "argument --direction: invalid choice: 'up' (choose from fwd, bwd, fwdbwd)"),
    (["--profile", "tf"], "argument --profile: invalid choice: 'tf' (choose from tacl, lucidrains)"),
    (["--heads", "0"], "argument --heads: expected an integer >= 1, got 0"),
    (["--dim", "0"], "argument --dim: expected an integer >= 1, got 0"),
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got 0"),
    (["--clusters", "0"], "argument --clusters: expected an integer >= 1, got 0"),
    (["--window", "0"], "argument --window: expected an integer >= 1, got 0"),
    (["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
    (["--tokens", "0"], "argument --tokens: expected an integer >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
    (["--repeats", "-1"], "argument --repeats: expected an integer >= 1, got -1"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    (["--max-seconds", "0"], "argument --max-seconds: expected a finite number > 0, got 0"),
    (["--max-seconds", "nan"], "argument --max-seconds: expected a finite number > 0, got nan"),
    (["--call-budget", "-1"], "argument --call-budget: expected a finite number > 0, got -1"),
    (["--memory-budget", "inf"], "argument --memory-budget: expected a finite number > 0, got inf"),
    (["--dense-max-gflop", "x"], "argument --dense-max-gflop: expected a finite number > 0, got 'x'"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda:x"], "argument --device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--batch", "2", "--tokens", "100"], "--batch, --tokens: give one (B fixed, or B from the token budget)"),
    (["--target", "fsat-vs-sdpa-16k"], "--target: only with --targets"),
    (["--targets", "--repeats", "3"], "--repeats: the targets need at least 7 interleaved pairs, got 3"),
    (["--targets", "--length", "1024"], "--length: is not an option of --targets (each target fixes its backends, "
                                        "shapes and dtype)"),
    (["--targets", "--backend", "torch", "--dtype", "float64"], "--backend, --dtype: are not options of --targets "
                                                                "(each target fixes its backends, shapes and dtype)"),
    (["--targets", "--target", "nope"], "argument --target: invalid choice: 'nope'"),
    (["--targets", "--target", "gpu-cupy-fsat-64k"], "--target: gpu-cupy-fsat-64k is not measured with --device cpu"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_BENCH_OPTIONS, ids=[" ".join(argv) for argv, _ in BAD_BENCH_OPTIONS])
def test_bench_rejects_a_bad_option_before_running_anything(argv: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The report: --length 0 ended in ZeroDivisionError, --backend bogus / --heads 0 / ... listed every case as
    'not run' and exited 0, --repeats 0 timed one call."""
    last = _usage_error(["bench", "--no-progress", *argv], capsys)
    unquoted = last.replace("'", "")  # argparse quotes the choices up to Python 3.11, not after
    assert unquoted.startswith(f"refattn bench: error: {message}".replace("'", "")), last


def test_the_argument_types_convert_and_name_what_they_expect() -> None:
    assert arguments.integer(1)("12") == 12
    assert arguments.integer(0, 3)("0") == 0
    assert arguments.number(0, open_low=True)("0.5") == 0.5
    assert arguments.device("cuda:1") == "cuda:1"
    assert arguments.backend_name("lucidrains")("lucidrains") == "lucidrains"
    for convert, text, message in (
        (arguments.integer(0, 3), "4", "expected an integer in [0, 3], got 4"),
        (arguments.integer(), "x", "expected an integer, got 'x'"),
        (arguments.number(0, 1), "1.5", "expected a finite number in [0, 1], got 1.5"),
        (arguments.number(high=2), "3", "expected a finite number <= 2, got 3"),
        (arguments.device, "cuda:", "expected cpu, cuda or cuda:N, got 'cuda:'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError) as error:
            convert(text)
        assert str(error.value) == message


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_bench_targets_on_cuda_without_a_device_fails_cleanly(tmp_path) -> None:
    """The device check calls exactly this; on a machine without CUDA it must say so, not trace back."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, "-m", "refattn", "bench", "--targets", "--device", "cuda", "--json",
                             str(tmp_path / "targets.json")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"refattn bench: no CUDA device: torch {torch.__version__} sees none "
                                     f"(torch.cuda.is_available() is False)")
    assert sorted(tmp_path.iterdir()) == []  # no JSON, no bench-results/
