"""What ``make conformance`` installs (issue 14, item 9): only the chosen backends' extras, torch's CPU build on a
machine without an NVIDIA GPU and PyPI's (CUDA) build with one. The Makefile and scripts/install.sh run for real,
against a stand-in virtual environment whose ``python`` and ``refattn`` record their arguments instead of
installing anything, and a stand-in ``nvidia-smi`` that lists a GPU or fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
[ "$*" = "-c import torch" ] && exit 1  # torch is not installed yet
exit 0
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None or sys.platform == "win32",
                                reason="needs make and a POSIX shell")


def _make(tmp_path: Path, gpu: bool, *variables: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run ``make conformance`` with the stand-ins; the commands the stand-ins received, one per line."""
    venv, fake = tmp_path / "venv", tmp_path / "bin"
    (venv / "bin").mkdir(parents=True)
    fake.mkdir()
    log = tmp_path / "log"
    for path in (venv / "bin" / "python", venv / "bin" / "refattn"):
        path.write_text(RECORDER.format(log=log))
        path.chmod(0o755)
    nvidia_smi = fake / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA H100'\n" if gpu else "exit 9\n"))
    nvidia_smi.chmod(0o755)
    environment = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("BACKENDS", None)
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "conformance", f"VENV={venv}",
                             *variables], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines(), result


def _installed(commands: list[str]) -> list[str]:
    prefix = "python -m pip install --quiet --disable-pip-version-check "
    return [command[len(prefix):] for command in commands if command.startswith(prefix)]


def test_without_a_gpu_only_torch_and_its_cpu_build(tmp_path: Path) -> None:
    commands, result = _make(tmp_path, gpu=False)
    assert _installed(commands) == ["--upgrade pip", "torch==2.13.0+cpu", "-e .[torch]"]
    assert "torch: no NVIDIA GPU: the CPU build torch==2.13.0+cpu" in result.stdout
    assert commands[-2:] == ["refattn info", "refattn conformance --backend numpy --backend torch"]


def test_with_a_gpu_pypi_torch_and_the_gpu_backends(tmp_path: Path) -> None:
    commands, _ = _make(tmp_path, gpu=True)
    assert _installed(commands) == [
        "--upgrade pip", "torch==2.13.0", "-e .[torch,cupy,numba]",
        "cupy-cuda12x==14.2.0 numba==0.68.1 numba-cuda==0.30.4 nvidia-cuda-nvrtc-cu12==12.9.86",
    ]
    assert commands[-1] == "refattn conformance --backend numpy --backend torch --backend cupy --backend numba_cuda"


def test_backends_chooses_what_is_installed(tmp_path: Path) -> None:
    commands, _ = _make(tmp_path, False, "BACKENDS=numpy")
    assert _installed(commands) == ["--upgrade pip", "-e ."]  # the reference: NumPy and SciPy only
    assert commands[-1] == "refattn conformance --backend numpy"


def test_an_unknown_extra_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "install.sh"), str(tmp_path / "venv"), "core", "cuda"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("scripts/install.sh: unknown extra 'cuda'; choose from core torch cupy numba "
                                     "test bench peer")
    assert not (tmp_path / "venv").exists()


def test_the_torch_extra_is_pypis_torch() -> None:
    """``pip install 'refattn[torch]'`` on a GPU machine gets PyPI's CUDA build: no CPU pin, no index in the extra."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.1"]
