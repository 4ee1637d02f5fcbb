"""How the Numba-CUDA kernels touch memory, measured on the accesses they make in the CUDA simulator.

Every element access of a kernel run in the simulator is recorded with its thread; the accesses one warp
makes to one array as the n-th access of each of its threads (uniform control flow: the same instruction)
form one request, and each request is scored as the hardware serves it:

- shared memory: the wavefronts of a request are the most distinct 4-byte words it hits in any one of
  the 32 banks; conflict-free is the minimum, ceil(distinct words / 32);
- device memory: the 32-byte sectors a request touches, against the fewest its distinct bytes need
  (allocations are 256-byte aligned, as cudaMalloc's).

The FSAT attention kernels (forward, the backward per query tile and per key tile) are held to
conflict-free shared memory and minimal sectors for their (B, H, L, D) operands, the FFT passes to
conflict-free shared memory, in both dtypes; the old layout of the attention tiles (``tile[tid * 32 + c]``)
is scored by the same measure to show that it tells them apart. ``pytest -s`` prints every figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

SIMULATED = """
import json
import sys
import threading
from collections import defaultdict

import numpy as np
from numba import cuda
from numba.cuda.np import numpy_support
from numba.cuda.simulator import kernelapi
from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray
from numba.cuda.simulator.kernel import BlockThread

from refattn.backends.numba_cuda import fft, fsat, runtime

runtime.Call(np.float32)  # installs the runtime's simulator settings, then ours replace its shared arrays
records = []  # (kernel, launch, space, root, label, kind, block, warp, ordinal, byte offset, itemsize, thread)
current = {"kernel": None, "launch": 0}
local = threading.local()


def root_of(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def record(space, array, flat, kind):
    thread = threading.current_thread()
    if not isinstance(thread, BlockThread):
        return
    root = root_of(array)
    base = root.__array_interface__["data"][0]
    offset = array.__array_interface__["data"][0] - base + flat
    if not hasattr(local, "counters"):  # per thread, once: its block, warp and lane, and its access counters
        local.counters, local.place = defaultdict(int), (tuple(thread.blockIdx), thread.thread_id // 32)
    key = (space, base, kind)
    # the array's label is formatted in score(): a dtype's str is slow, and every access of every thread lands here
    records.append((current["kernel"], current["launch"], space, base, (root.dtype, root.shape), kind,
                    *local.place, local.counters[key], offset, array.itemsize, thread.thread_id % 32))
    local.counters[key] += 1


def byte_offset(array, index):
    index = index if isinstance(index, tuple) else (index,)
    return sum(int(i) * s for i, s in zip(index, array.strides))


class Shared(np.ndarray):
    def __getitem__(self, index):
        record("shared", self, byte_offset(self, index), "read")
        return np.ndarray.__getitem__(self, index)

    def __setitem__(self, index, value):
        record("shared", self, byte_offset(self, index), "write")
        np.ndarray.__setitem__(self, index, value)


lock = threading.Lock()


def shared_array(self, shape, dtype, alignment=None):
    # the simulator's (as the runtime installs it: one array per block and caller line), recording
    frame = sys._getframe(1)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with lock:
        if caller not in self._allocations:
            self._allocations[caller] = np.empty(shape, numpy_support.as_dtype(dtype))
    return self._allocations[caller].view(Shared)


kernelapi.FakeCUDAShared.array = shared_array
within_get, within_set = FakeWithinKernelCUDAArray.__getitem__, FakeWithinKernelCUDAArray.__setitem__


def get(self, index):
    array = self._item._ary
    record("global", array, byte_offset(array, index), "read")
    return within_get(self, index)


def put(self, index, value):
    array = self._item._ary
    record("global", array, byte_offset(array, index), "write")
    within_set(self, index, value)


FakeWithinKernelCUDAArray.__getitem__, FakeWithinKernelCUDAArray.__setitem__ = get, put
launch = runtime.Call.run


def run(self, planned, args, dtype):
    current["kernel"] = planned.kernel
    current["launch"] += 1
    launch(self, planned, args, dtype)


runtime.Call.run = run


def score(selected):
    # worst and total (cost, ideal) per (kernel, space, array) over the selected records' requests
    requests, labels = defaultdict(set), {}
    for kernel, launch, space, base, array, kind, block, warp, ordinal, offset, itemsize, thread in selected:
        label = labels.get(array) or labels.setdefault(array, f"{array[0]}{list(array[1])}")
        requests[(kernel, space, label, kind, launch, base, block, warp, ordinal)].add((offset, itemsize, thread))
    table = {}
    for (kernel, space, label, kind, *_), accesses in requests.items():
        if space == "shared":  # 8-byte elements: each half-warp is served on its own
            cost = ideal = 0
            for phase in {thread * max(4, itemsize) // 128 for _, itemsize, thread in accesses}:
                words = {offset // 4 + w for offset, itemsize, thread in accesses for w in range(max(1, itemsize // 4))
                         if thread * max(4, itemsize) // 128 == phase}
                banks = defaultdict(int)
                for word in words:
                    banks[word % 32] += 1
                cost, ideal = cost + max(banks.values()), ideal - (-len(words) // 32)
        else:
            sectors = {(offset + b) // 32 for offset, itemsize, _ in accesses for b in (0, itemsize - 1)}
            elements = {(offset, itemsize) for offset, itemsize, _ in accesses}
            cost, ideal = len(sectors), -(-sum(itemsize for _, itemsize in elements) // 32)
        entry = table.setdefault(f"{kernel} {space} {kind} {label}", [0.0, 0, 0])
        entry[0] = max(entry[0], cost / ideal)
        entry[1] += cost
        entry[2] += ideal
    return table


results = {}
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):
    records.clear()
    L, D, K = 64, 64, 3
    q, k, v, dout = (rng.standard_normal((1, 1, L, D)).astype(dtype) for _ in range(4))
    offsets = np.array([[[-32, 0, 32]]])  # whole tiles of partner rows: every warp's control flow uniform
    fsat.sparse_attention_vjp(*map(cuda.to_device, (q, k, v)), cuda.to_device(offsets), None, cuda.to_device(dout))
    for length, max_radix in ((40, 8), (70, None)):  # M = 64 in two passes of radix 8; M = 128 in one pass
        x = rng.standard_normal((1, 2, length, 8)).astype(dtype)  # 16 rows of FFTs: whole sectors of columns
        out = runtime.Call(dtype).empty((1, 2, 2 * length - 1, 8))
        ones = [cuda.to_device(np.ones((1, n), dtype)) for n in (length, 2 * length - 1)]
        fft.convolve(runtime.Call(dtype), cuda.to_device(x), ones[0], True, cuda.to_device(x), ones[0], False, 0,
                     out, ones[1], max_radix=max_radix)
    results[np.dtype(dtype).name] = score(records)

# the old tile layout, tile[tid * 32 + c] read by 32 threads at once: the measure must call it 32-way
tile = (np.dtype(np.float32), (1024,))
old = [("old_tile_k", 0, "shared", 0, tile, "read", (0, 0, 0), 0, c, 4 * (tid * 32 + c), 4, tid)
       for tid in range(32) for c in range(32)]
results["old layout"] = score(old)
print("SCORES " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, list[float]]]:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED)], env=env, capture_output=True,
                          text=True, timeout=1_200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("SCORES "))
    found = json.loads(line[len("SCORES "):])
    for dtype, table in found.items():  # the figures, for the log (pytest -s)
        for name, (worst, cost, ideal) in sorted(table.items()):
            print(f"{dtype:10} {name:70} worst {worst:5.2f}x  total {cost} / {ideal}")
    return found


ATTENTION = ("sparse_forward_k", "sparse_backward_query_k", "sparse_backward_key_k")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_attention_tiles_and_the_fft_passes_are_free_of_bank_conflicts(scores, dtype):
    kernels = (*ATTENTION, "fft_pass_k")
    shared = {name: figures for name, figures in scores[dtype].items() if " shared " in name
              and name.split()[0] in kernels}
    assert {name.split()[0] for name in shared} == set(kernels)
    assert all(worst == 1.0 for worst, _, _ in shared.values()), shared


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_attention_kernels_touch_the_fewest_sectors_of_their_operands(scores, dtype):
    """q, k, v, dout read and out, dq, dk, dv written whole sectors at a time (the (B, H, L, D) arrays;
    probs and dz, (B, H, L, K), are a row's K values per offset and not held to it)."""
    operands = {name: figures for name, figures in scores[dtype].items() if " global " in name
                and name.split()[0] in ATTENTION and name.endswith("[1, 1, 64, 64]")}
    kinds = {(name.split()[0], name.split()[2]) for name in operands}
    assert kinds == {(kernel, kind) for kernel in ATTENTION for kind in ("read", "write")}
    assert all(worst == 1.0 for worst, _, _ in operands.values()), operands


def test_the_measure_calls_the_old_tile_layout_32_way(scores):
    assert list(scores["old layout"].values()) == [[32.0, 32 * 32, 32]]
