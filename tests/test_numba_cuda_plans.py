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


def test_pair_counts_are_closed_form_without_a_mask_and_made_once_per_call():
    """Without a mask n_tau = L - |tau| is one kernel over the 2L - 1 offsets (no FFT, no O(L^2) count);
    an attention call and its gradient make the counts (and their inverses) once, however many steps use them."""
    shape = Shape(1, 8, 65_536, 64, 64, top_k=16, clusters=256, window=256)
    counts = plans.plan("fsat.pair_counts", shape, "float32").launches
    assert [(launch.kernel, launch.bytes_moved) for launch in counts] == [("pair_counts_k", 8 * (2 * 65_536 - 1))]
    for name in ("fsat.attention", "fsat.attention_vjp"):
        kernels = [launch.kernel for launch in plans.plan(name, shape, "float32").launches]
        made = kernels.count("pair_counts_k") + kernels.count("rounded_counts_k")
        assert made == 1 and kernels.count("inverse_counts_k") == 1, (name, made)


def test_the_dw_reduction_runs_in_parallel_over_the_batch_and_the_offsets():
    """At B = H = 16, L = 65,536, Dc = 128: 1,024 blocks of 256 threads per head (4,194,304 threads), each
    adding at most 256 (b, tau) items per feature, where one thread per (h, feature) added all 2,097,136."""
    shape = Shape(16, 16, 65_536, 128, 128, top_k=16, clusters=256, window=256)
    (parts,) = [launch for launch in plans.plan("fsat.estimate_vjp", shape, "float32").launches
                if launch.kernel == "estimate_dw_parts_k"]
    lanes, rows, _ = parts.block
    assert parts.grid == (16 * 1_024, 1, 1) and lanes * rows == 256
    items = 16 * (2 * 65_536 - 1)
    per_part = -(-items // 1_024)  # contiguous items of a block, every rows-th one to a thread
    assert items == 2_097_136 and per_part == 2_048 and -(-per_part // rows) == 256


def test_the_selection_is_a_radix_select_linear_in_the_row():
    """Rows of 2L - 2 candidates over 256 take the radix select, one block of 256 threads per row; its
    traffic is at most 9 sweeps of the row's int64 keys (8 digit passes and the placing sweep): linear in
    L (16 times L gives 16 times the traffic, where ranking by counting grew 256-fold)."""
    def radix(length: int):
        shape = Shape(2, 8, length, 64, 64, top_k=16, clusters=256, window=256)
        (launch,) = [launch for launch in plans.plan("fsat.select", shape, "float32").launches
                     if launch.kernel in ("radix_select_k", "rank_select_k")]
        return launch

    short, long = radix(65_536), radix(1_048_576)
    assert short.kernel == long.kernel == "radix_select_k"
    assert long.grid == (16, 1, 1) and long.block == (256, 1, 1)
    assert long.bytes_moved == 16 * ((2 * 1_048_576 - 2) * 9 + 15) * 8
    assert round(long.bytes_moved / short.bytes_moved, 3) == 16.0
