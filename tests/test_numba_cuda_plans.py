"""The Numba-CUDA backend's launch plans are its launches: run in the CUDA simulator, every function's
device core launches exactly the launches (kernel, grid, block, shared memory, largest index, traffic
model) that ``Backend.plans`` reports for the same shape, in the same order; the planned memory peak
and bound are consistent with the outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

from refattn.backends.launch import Shape  # noqa: E402
from refattn.backends.numba_cuda import plans  # noqa: E402

SIMULATED = """
import numpy as np
from numba import cuda
from refattn.backends.launch import Shape
from refattn.backends.numba_cuda import plans, runtime

class Recording(runtime.Call):
    def __init__(self, dtype):
        super().__init__(dtype)
        self.simulated = False  # the device's launches (the simulator's own are a single warp where they may)
        self.launches = []

    def run(self, planned, args, dtype):
        self.launches.append(planned)
        super().run(planned, args, dtype)

rng = np.random.default_rng(0)
for shape, dtype in ((Shape(2, 2, 5, 3, 4, top_k=3, clusters=2, window=3), "float32"),
                     (Shape(1, 2, 300, 2, 2, top_k=4, clusters=2, window=5), "float64")):
    for name, (run, _) in plans.FUNCTIONS.items():
        if shape.length == 300 and name not in ("fsat.select", "routing.route", "fsat.cross_vjp"):
            continue  # the long rows: the radix selection and several FFT passes
        call = Recording(dtype)
        floats = lambda size: cuda.to_device(rng.standard_normal(size).astype(dtype))
        run(call, plans.inputs(name.split(".")[0], shape, floats, cuda.to_device))
        planned = plans.plan(name, shape, dtype).launches
        differ = [i for i, (got, want) in enumerate(zip(call.launches, planned)) if got != want]
        assert len(call.launches) == len(planned) and not differ, (name, shape, len(call.launches), len(planned),
                                                                  differ[:1] and (call.launches[differ[0]],
                                                                                  planned[differ[0]]))
        assert planned, name
print("every launch as planned")
"""


def test_the_planned_launches_are_the_launches():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "every launch as planned" in done.stdout


def test_a_peak_holds_the_outputs_and_stays_within_its_bound():
    shape = Shape(1, 8, 65_536, 64, 64, top_k=16, clusters=256, window=256)
    sparse = plans.plan("fsat.sparse_attention", shape, "float32")
    assert sparse.peak_bytes >= 4 * 8 * 65_536 * (64 + 1)  # out and lse stay alive: they are the results
    cross = plans.plan("fsat.cross", shape, "float32")
    assert cross.peak_bytes <= cross.bound_bytes
    # the FFT buffers are a bounded chunk: at most 256 MiB beyond the (B, H, 2L - 1, Dc) cross
    assert cross.peak_bytes - 4 * 8 * (2 * 65_536 - 1) * 64 <= 300 * 2**20


def test_the_masked_pair_counts_take_float64_kernels_in_a_float32_call():
    """Counts are exact in float64 whatever the compute dtype: the FFT of the validity runs the float64
    kernels (their shared memory is twice the float32 ones')."""
    plan = plans.plan("fsat.pair_counts (masked)", Shape(1, 1, 100, 8, 8), "float32")
    passes = [launch for launch in plan.launches if launch.kernel == "fft_pass_k"]
    assert passes and {launch.static_shared_bytes for launch in passes} == {4 * 1_024 * 8}
