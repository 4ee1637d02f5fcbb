"""Every kernel of the Numba-CUDA backend compiles to PTX for sm_80 and sm_90, float32 and float64, without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")


def test_every_kernel_compiles_to_ptx():
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # compile_ptx needs the real numba.cuda
    done = subprocess.run([sys.executable, "-m", "refattn.backends.numba_cuda.ptx_check", "--cc", "8.0", "9.0"],
                          env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, "\n".join(line for line in done.stdout.splitlines() if line.startswith("FAIL")) \
        or done.stderr[-3000:]
    assert " 0 of " not in done.stdout
