"""The Numba-CUDA backend's FFTs: the NumPy emulation of the kernels' arithmetic against NumPy's FFT and a
float64 convolution, the kernels against the emulation (bit for bit, in the CUDA simulator), and the
float32 gradient of the cross at L = 262,144 through the emulation against the float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

import refattn.fsat as reference  # noqa: E402
from refattn.backends.numba_cuda import fft  # noqa: E402
from refattn.conformance.tolerances import GRADIENT  # noqa: E402


def _complex_fft(z: np.ndarray, max_radix: int, direction: int) -> np.ndarray:
    """The M-point transform of every column of z (M, columns) by the emulated passes."""
    half = z.shape[0]
    plan = fft.fft_plan(2 * half, z.shape[1], z.real.dtype.itemsize, max_radix)
    twr, twi = fft.twiddle_table(plan.size, z.real.dtype.name)
    zr, zi = np.ascontiguousarray(z.real), np.ascontiguousarray(z.imag)
    stride = 1
    for radix in plan.radices:
        zr, zi = fft.emulate_pass(zr, zi, twr, twi, stride, radix, direction)
        stride *= radix
    return zr + 1j * zi


@pytest.mark.parametrize("half, max_radix", [(1, None), (2, None), (64, 4), (64, 8), (256, 16), (1024, None),
                                             (4096, 8)])
def test_the_emulated_passes_are_the_discrete_fourier_transform(half, max_radix):
    rng = np.random.default_rng(half)
    z = rng.standard_normal((half, 3)) + 1j * rng.standard_normal((half, 3))
    np.testing.assert_allclose(_complex_fft(z, max_radix, 1), np.fft.fft(z, axis=0), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(_complex_fft(z, max_radix, -1), np.fft.ifft(z, axis=0) * half, rtol=1e-12,
                               atol=1e-10)


def test_a_plan_has_few_passes_and_bounded_buffers():
    plan = fft.fft_plan(3 * 1_048_576 - 2, 16 * 16 * 128, 4)
    assert plan.size == 1 << 22 and len(plan.radices) == 3 and np.prod(plan.radices) == plan.half
    assert fft.BUFFERS * plan.half * plan.chunk * 4 <= fft.FFT_BUDGET_BYTES
    one_row = fft.fft_plan(1 << 31, 4, 8)  # a row beyond the budget: one row at a time
    assert one_row.chunk == 1


@pytest.mark.parametrize("reverse", [(True, False), (False, True), (False, False)])
def test_the_emulated_convolution_is_the_linear_convolution(reverse):
    """float64: every term of the full convolution, masked weights, an offset and several chunks."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((2, 2, 37, 3)), rng.standard_normal((2, 2, 21, 3))
    wx, wy = rng.random((2, 37)), rng.random((1, 21))
    out_weight = rng.random((2, 30))
    got = fft.emulate_convolve(x, wx, reverse[0], y, wy, reverse[1], 5, 30, out_weight, max_radix=4,
                               budget=fft.BUFFERS * 32 * 8 * 5)
    xs = x * wx[:, None, :, None]
    ys = y * wy[:, None, :, None]
    xs, ys = (xs[:, :, ::-1] if reverse[0] else xs), (ys[:, :, ::-1] if reverse[1] else ys)
    full = np.zeros((2, 2, 57, 3))
    for i in range(37):
        full[:, :, i:i + 21] += xs[:, :, i:i + 1] * ys
    np.testing.assert_allclose(got, full[:, :, 5:35] * out_weight[:, None, :, None], rtol=1e-12, atol=1e-12)


def _cross_vjp_float32(a: np.ndarray, b: np.ndarray, dc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The device's cross_vjp arithmetic (fsat.cross.cross_vjp_core, no padding), emulated in float32."""
    length = a.shape[2]
    valid = np.ones((1, length), np.float32)
    inverse = (1.0 / reference.pair_counts(length)).astype(np.float32)
    a, b, dc = (x.astype(np.float32) for x in (a, b, dc))
    da = fft.emulate_convolve(b, valid, False, dc, inverse, True, length - 1, length, valid)
    db = fft.emulate_convolve(a, valid, False, dc, inverse, False, length - 1, length, valid)
    return da, db


def test_float32_cross_gradients_at_long_sequences():
    """At L = 262,144, every entry of da and db computed with the device's float32 arithmetic is within
    the float32 gradient tolerance of the float64 reference (a transform per signal: packing b and
    g = dc / n in one complex FFT resolved the smaller only to ε·|larger|, thousands of entries off)."""
    length = 262_144
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 1, length, 4))
    dc = rng.standard_normal((1, 1, 2 * length - 1, 4))
    got = _cross_vjp_float32(a, b, dc)
    want = reference.cross_vjp(a, b, dc)
    tolerance = GRADIENT["float32"]  # held absolute: |x - r| <= atol + rtol |r| (spec/interface.md)
    for g, w in zip(got, want, strict=True):
        outside = np.abs(g - w) > tolerance.atol + tolerance.rtol * np.abs(w)
        assert g.dtype == np.float32 and not outside.any(), f"{outside.sum()} of {w.size} entries outside"


SIMULATED = """
import numpy as np
from numba import cuda
from refattn.backends.numba_cuda import fft, runtime

rng = np.random.default_rng(3)
for dtype, reverse in ((np.float32, (True, False)), (np.float32, (False, True)), (np.float64, (False, False))):
    x = rng.standard_normal((1, 2, 40, 3)).astype(dtype)
    y = rng.standard_normal((1, 2, 27, 3)).astype(dtype)
    wx, wy, wo = (rng.random(shape).astype(dtype) for shape in ((1, 40), (1, 27), (1, 50)))
    budget = fft.BUFFERS * 64 * dtype().itemsize * 4  # M = 64: 4 rows a chunk, 2 chunks
    want = fft.emulate_convolve(x, wx, reverse[0], y, wy, reverse[1], 9, 50, wo, max_radix=4, budget=budget)
    call = runtime.Call(dtype)
    out = call.empty((1, 2, 50, 3))
    fft.convolve(call, *map(cuda.to_device, (x, wx)), reverse[0], *map(cuda.to_device, (y, wy)), reverse[1], 9, out,
                 cuda.to_device(wo), max_radix=4, budget=budget)
    got = out.copy_to_host()
    assert got.dtype == want.dtype == dtype
    assert np.array_equal(got, want), (dtype, np.abs(got - want).max())
print("kernels = emulation")
"""


def test_the_kernels_compute_what_the_emulation_computes():
    """In the CUDA simulator, three passes of radix 4, two chunks of rows: bit for bit."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kernels = emulation" in done.stdout
