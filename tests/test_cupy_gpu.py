"""The CuPy backend on a CUDA device: interchange with torch and Numba (no copy, the producer's stream
respected), and the device-memory plans against the memory pool's measured peak, up to the realistic
routing shape B = H = 16, L = 65,536, C = W = 256.

Skipped, with the reason, on machines without a CUDA device; ``make device-check`` runs them on one (the
conformance suite on the device is its own stage there). With REFATTN_DEVICE_CHECK_OUT set, the measured
peaks are written to that folder as cupy-memory.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

import cupy

from refattn.backends import cupy as cupy_backend
from refattn.backends.cupy import fsat, plans, routing
from refattn.backends.launch import Shape

_DEVICES = [name for name in cupy_backend.backend().capabilities.devices if name.startswith("cuda")]
pytestmark = pytest.mark.skipif(not _DEVICES, reason="CuPy backend: no CUDA device (or REFATTN_CUDA_EMULATION=1)")


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def test_zero_copy_with_torch_and_numba():
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((1, 2, 6, 4)), dtype=cupy.float32)
    offsets = cupy.asarray(np.tile([-1, 0, 2], (1, 2, 1)))
    out, _ = fsat.sparse_attention(q, q, q, offsets)
    torch = _torch_cuda()
    tensor = torch.from_dlpack(out)
    assert tensor.data_ptr() == out.data.ptr
    again, _ = fsat.sparse_attention(torch.from_dlpack(q), q, q, offsets)
    cupy.testing.assert_allclose(again, out)
    numba_cuda = pytest.importorskip("numba.cuda")
    view = numba_cuda.as_cuda_array(out)
    assert view.__cuda_array_interface__["data"][0] == out.data.ptr
    cupy.testing.assert_allclose(fsat.sparse_attention(view, q, q, offsets)[0], out)


def test_a_tensor_written_on_a_torch_side_stream_is_read_after_the_write():
    torch = _torch_cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(500_000_000)  # keeps the side stream busy for a good fraction of a second
        q = torch.full((1, 1, 4, 2), 3.0, device="cuda")  # allocated and written on the side stream
    c = fsat.cross(q, q)  # no synchronisation by the caller: DLPack hands torch CuPy's stream to wait on
    cupy.testing.assert_allclose(c, cupy.full((1, 1, 7, 2), 9.0))


def test_a_cuda_tensor_that_requires_grad_raises_type_error():
    torch = _torch_cuda()
    q = torch.ones((1, 1, 3, 2), device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match=r"q: expected a tensor without autograd, got one that requires grad"):
        fsat.cross(q, q.detach())


@pytest.mark.skipif(len(_DEVICES) < 2, reason="needs two CUDA devices")
def test_arrays_on_two_devices_raise_value_error():
    a = cupy.ones((1, 1, 3, 2))
    with cupy.cuda.Device(1):
        b = cupy.ones((1, 1, 3, 2))
    with pytest.raises(ValueError, match=r"b: expected an array on the device of a \(CUDA device 0\), got one on CUDA "
                                         r"device 1"):
        fsat.cross(a, b)


class _PeakPool:
    """CuPy's allocator, with the high-water mark of the bytes in use."""

    def __init__(self) -> None:
        self.pool = cupy.cuda.MemoryPool()
        self.peak = 0

    def malloc(self, size: int):
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return memory


MEASURED: dict[str, dict] = {}

# (name, shape, call): realistic routing and FSAT shapes, and one small enough for many groups of heads.
CASES = [
    ("routing.attention", Shape(16, 16, 65_536, 64, 64, clusters=256, window=256),
     lambda x: routing.attention(x["q"], x["k"], x["v"], x["centroids"], window=256)),
    ("routing.local_attention", Shape(16, 16, 65_536, 64, 64, clusters=256, window=256),
     lambda x: routing.local_attention(x["q"], x["k"], x["v"], 256, causal=True)),
    ("fsat.attention", Shape(16, 16, 65_536, 64, 64, top_k=16),
     lambda x: fsat.attention(x["q"], x["k"], x["v"], x["w"], 16)),
    ("fsat.attention_vjp", Shape(2, 8, 16_384, 64, 64, top_k=16),
     lambda x: fsat.attention_vjp(x["q"], x["k"], x["v"], x["w"], 16, x["v"])),
    ("routing.attention_vjp", Shape(2, 8, 16_384, 64, 64, clusters=128, window=128),
     lambda x: routing.attention_vjp(x["q"], x["k"], x["v"], x["centroids"], x["v"], window=128)),
]


@pytest.mark.parametrize("name, shape, call", CASES, ids=[f"{c[0]} {c[1].label()}" for c in CASES])
def test_the_measured_device_memory_peak_stays_within_the_plan(name, shape, call):
    generator = cupy.random.default_rng(0)
    x = {n: generator.standard_normal((shape.batch, shape.heads, shape.length, shape.dim), dtype=cupy.float32)
         for n in ("q", "k", "v")}
    x["w"] = cupy.ones((shape.heads, shape.dim), dtype=cupy.float32)
    x["centroids"] = cupy.asarray(routing.init_centroids(shape.heads, shape.clusters, shape.dim,
                                                         rng=np.random.default_rng(1)).means, dtype=cupy.float32)
    call(x)  # compiles and plans the FFTs outside the measurement
    cupy.cuda.Device().synchronize()
    counter = _PeakPool()
    cupy.cuda.set_allocator(counter.malloc)
    try:
        started = time.perf_counter()
        result = call(x)
        cupy.cuda.Device().synchronize()
        seconds = time.perf_counter() - started
        del result
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
    plan = next(p for p in plans.plans(shape, "float32") if p.function == name)
    MEASURED[f"{name} {shape.label()}"] = dict(measured_peak_bytes=counter.peak, planned_peak_bytes=plan.peak_bytes,
                                               bound_bytes=plan.bound_bytes, seconds=seconds)
    folder = os.environ.get("REFATTN_DEVICE_CHECK_OUT")
    if folder:
        Path(folder, "cupy-memory.json").write_text(json.dumps(MEASURED, indent=2))
    assert counter.peak <= plan.peak_bytes, MEASURED
