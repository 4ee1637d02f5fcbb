"""The conformance suite against the CuPy backend run as CUDA C emulated on the CPU (REFATTN_CUDA_EMULATION=1:
NumPy arrays, the kernels compiled by g++): every check passes, and nothing is skipped for want of a device
(bfloat16 only, which CuPy has no dtype for). Emulated, not a GPU: tests/test_cupy_gpu.py and
``make device-check`` run the device."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")


def test_the_conformance_suite_passes_with_the_cuda_c_emulated_on_the_cpu():
    environment = {**os.environ, "REFATTN_CUDA_EMULATION": "1"}
    result = subprocess.run([sys.executable, "-m", "refattn", "conformance", "--backend", "cupy", "--quick"],
                            capture_output=True, text=True, timeout=1800, env=environment)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    counts = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", result.stdout, re.MULTILINE)
    assert counts and int(counts[1]) > 1000 and counts[2] == "0", result.stdout[-2000:]
    skipped = [line for line in result.stdout.splitlines() if " skip " in line]
    assert all("does not support bfloat16" in line for line in skipped), skipped
    assert "GPU" not in result.stdout
