"""The ``refattn`` command: top-level help and version, and every option of every subcommand validated by
refattn.arguments or argparse's choices before anything runs (usage error, exit status 2, the option
named, what it expects, what came)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
    assert "--version" in text and "bench" in text and "conformance" in text and "quality" in text


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, read from the parser itself: a new subcommand is checked below too."""
    actions = cli.build_parser()._actions  # argparse has no public list of actions
    return dict(next(action for action in actions if action.dest == "command").choices)


SUBCOMMANDS = tuple(_subcommands())


def test_the_subcommands() -> None:
    assert {"info", "conformance", "bench", "quality"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_is_plain_text(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: refattn {command}")
    for markup in ("``", ":mod:", ":func:", ":class:", ":meth:"):
        assert markup not in text, markup


def _value_options() -> list[tuple[str, argparse.Action]]:
    """(subcommand, action) for every option of every subcommand that takes a value."""
    return [(command, action) for command, subparser in _subcommands().items() for action in subparser._actions
            if action.option_strings and action.nargs != 0]


VALUE_OPTIONS = _value_options()
PATH_TYPES = (arguments.output_file, arguments.output_directory)


def test_every_subcommand_has_its_value_options() -> None:
    names = {(command, action.option_strings[-1]) for command, action in VALUE_OPTIONS}
    assert {("conformance", "--backend"), ("conformance", "--json"), ("bench", "--length"), ("bench", "--out"),
            ("quality", "--steps"), ("quality", "--out")} <= names
    assert len(VALUE_OPTIONS) >= 51  # 6 conformance + 23 bench + 22 quality


@pytest.mark.parametrize(("command", "action"), VALUE_OPTIONS,
                         ids=[f"{command} {action.option_strings[-1]}" for command, action in VALUE_OPTIONS])
def test_every_option_is_validated_before_anything_runs(command: str, action: argparse.Action, tmp_path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Each option taking a value has fixed choices or a converter of refattn.arguments; a bad value ('x', or
    a path below a file) is a usage error naming the option, what it expects and what came."""
    option = action.option_strings[-1]
    if action.choices is not None:
        bad, expected = "x", "invalid choice: 'x' (choose from "
    elif action.type in PATH_TYPES:
        (tmp_path / "file").write_text("")
        bad = str(tmp_path / "file" / "x")
        expected = f"got {bad!r}: {str(tmp_path / 'file')!r} is not a folder"
    else:
        assert getattr(action.type, "__module__", None) == "refattn.arguments", (
            f"refattn {command} {option}: its value is not validated by refattn.arguments nor by choices")
        bad, expected = "x", "'x'"  # 'got 'x'', or 'unknown backend 'x'; choose from ...'
    last = _usage_error([command, option, bad], capsys)
    assert last.startswith(f"refattn {command}: error: argument {option}: "), last
    assert expected in last, last
    assert "expected" in last or "choose from" in last, last
    assert sorted(tmp_path.iterdir()) in ([], [tmp_path / "file"])  # nothing written


BAD_CONFORMANCE_OPTIONS = [
    (["--backend", "bogus"], "argument --backend: unknown backend 'bogus'; choose from numpy, torch, cupy, "
                             "numba_cuda"),
    (["--function", "bogus"], "argument --function: unknown function 'bogus'; choose from assign, attention, "),
    (["--algorithm", "fsat", "--function", "route"], "--function: no checks for route with --algorithm fsat; the "
                                                     "checked functions are attention, "),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from float64, float32, bfloat16, "
                            "float16)"),
    (["--algorithm", "linear"], "argument --algorithm: invalid choice: 'linear' (choose from fsat, routing)"),
    (["--part", "all"], "argument --part: invalid choice: 'all' (choose from base, ties, extreme, large)"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_CONFORMANCE_OPTIONS,
                         ids=[" ".join(argv) for argv, _ in BAD_CONFORMANCE_OPTIONS])
def test_conformance_rejects_a_bad_option_before_running_anything(argv: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    last = _usage_error(["conformance", *argv], capsys)
    assert last.replace("'", "").startswith(f"refattn conformance: error: {message}".replace("'", "")), last


def test_conformance_json_path_is_checked_before_the_run(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was written after the whole run: a missing folder ended a finished run in FileNotFoundError."""
    last = _usage_error(["conformance", "--json", str(tmp_path)], capsys)
    assert last == (f"refattn conformance: error: argument --json: expected a file path that can be written, "
                    f"got {str(tmp_path)!r}: it is a folder")
    path = tmp_path / "new" / "folder" / "report.json"  # missing folders are made
    assert cli.main(["conformance", "--backend", "numpy", "--function", "pair_counts", "--quick",
                     "--json", str(path)]) == 0
    passed = [row for row in json.loads(path.read_text()) if row["status"] == "pass"]
    assert len(passed) == 6 and {row["function"] for row in passed} == {"pair_counts"}


BAD_QUALITY_OPTIONS = [
    (["--length", "8"], "argument --length: expected an integer >= 16, got 8"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "ten"], "argument --steps: expected an integer >= 1, got 'ten'"),
    (["--seconds", "nan"], "argument --seconds: expected a finite number > 0, got nan"),
    (["--seconds", "0"], "argument --seconds: expected a finite number > 0, got 0"),
    (["--batch", "-2"], "argument --batch: expected an integer >= 1, got -2"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got 0"),
    (["--eval-size", "0"], "argument --eval-size: expected an integer >= 1, got 0"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--dim", "2.5"], "argument --dim: expected an integer >= 1, got '2.5'"),
    (["--heads", "0"], "argument --heads: expected an integer >= 1, got 0"),
    (["--depth", "0"], "argument --depth: expected an integer >= 1, got 0"),
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got 0"),
    (["--local-block", "0"], "argument --local-block: expected an integer >= 1, got 0"),
    (["--noise-scale", "-1"], "argument --noise-scale: expected a finite number >= 0, got -1"),
    (["--noise-final", "nan"], "argument --noise-final: expected a finite number >= 0, got nan"),
    (["--noise-steps", "0"], "argument --noise-steps: expected an integer >= 1, got 0"),
    (["--task", "sort"], "argument --task: invalid choice: 'sort' (choose from copy, listops, recall, planted)"),
    (["--dim", "30", "--heads", "4"], "--dim, --heads: expected the width divisible by the heads, got 30 and 4"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_QUALITY_OPTIONS,
                         ids=[" ".join(argv) for argv, _ in BAD_QUALITY_OPTIONS])
def test_quality_rejects_a_bad_option_before_running_anything(argv: list[str], message: str, tmp_path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    last = _usage_error(["quality", "--out", str(tmp_path / "out"), *argv], capsys)
    assert last.replace("'", "").startswith(f"refattn quality: error: {message}".replace("'", "")), last
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file_is_rejected(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("")
    for command in ("bench", "quality"):
        last = _usage_error([command, "--out", str(tmp_path / "taken")], capsys)
        assert last == (f"refattn {command}: error: argument --out: expected a folder that exists or can be made, "
                        f"got {str(tmp_path / 'taken')!r}: it is a file")


@pytest.mark.parametrize(("argv", "last_line"), [
    (["bench", "--length", "0"], "refattn bench: error: argument --length: expected an integer >= 1, got 0"),
    (["conformance", "--backend", "bogus"], "refattn conformance: error: argument --backend: unknown backend 'bogus'"),
    (["quality", "--steps", "-1"], "refattn quality: error: argument --steps: expected an integer >= 1, got -1"),
    (["bogus"], "refattn: error: argument command: invalid choice: 'bogus'"),
    ([], "refattn: error: the following arguments are required: command"),
], ids=["bench", "conformance", "quality", "unknown command", "no command"])
def test_the_console_command_exits_2_without_a_traceback(argv: list[str], last_line: str, tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "refattn", *argv], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines()[0].startswith("usage: refattn")
    assert result.stderr.strip().splitlines()[-1].startswith(last_line), result.stderr
    assert sorted(tmp_path.iterdir()) == []


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


def _readme_commands() -> list[str]:
    """The README's ``refattn SUBCOMMAND ...`` command lines: in its shell blocks (continuation lines joined) and
    in its inline code (a line break inside is a space); ``refattn COMMAND --help`` and the like are prose."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).replace("\n", " ")
    lines += re.findall(r"`([^`]*refattn [^`]*)`", prose)
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # NUMBA_ENABLE_CUDASIM=1 refattn ...
            words = words[1:]
        if words[:1] == ["refattn"] and len(words) > 1 and words[1] in SUBCOMMANDS:
            commands.append(shlex.join(words[1:]))
    return list(dict.fromkeys(commands))


README_COMMANDS = _readme_commands()


def test_the_readme_has_refattn_commands() -> None:
    assert len(README_COMMANDS) >= 13 and any(command.startswith("bench") for command in README_COMMANDS)


@pytest.mark.parametrize("command", README_COMMANDS)
def test_every_readme_command_line_parses(command: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``refattn`` line of the README is a valid command line as written (parsed, not run)."""
    monkeypatch.chdir(tmp_path)  # relative output paths resolve in an empty folder
    arguments = cli.build_parser().parse_args(shlex.split(command))
    assert callable(arguments.run)
