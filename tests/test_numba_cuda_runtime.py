"""How a call of the Numba-CUDA backend takes its device inputs (in the CUDA simulator): inputs of another
floating dtype are converted on the device, not through the host; strided views are used; the NaN/Inf
count steps over every element however small its grid; the messages are the reference's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

SIMULATED = """
import numpy as np
from numba import cuda
import refattn.fsat as reference
from refattn.backends.numba_cuda import fsat, runtime

launched, copied = [], []
run, host = runtime.Call.run, runtime.Call.host
runtime.Call.run = lambda self, planned, args, dtype: (launched.append(planned.kernel), run(self, planned, args, dtype))
runtime.Call.host = lambda self, x: (copied.append((tuple(x.shape), str(x.dtype))), host(self, x))[1]

rng = np.random.default_rng(0)
q, k = rng.standard_normal((2, 2, 40, 5, 2)), rng.standard_normal((2, 2, 40, 5))
v = rng.standard_normal((2, 2, 40, 3))
offsets = np.array([-2, 0, 1, 3])[None, None].repeat(2, 0).repeat(2, 1)

# float16 q (a strided view: every other feature), float32 k, float64 v: computed in float64
q16 = cuda.to_device(q.astype(np.float16))[:, :, :, :, 0]
want = reference.sparse_attention(q[..., 0].astype(np.float16), k.astype(np.float32), v, offsets)
got = fsat.sparse_attention(q16, cuda.to_device(k.astype(np.float32)), cuda.to_device(v), cuda.to_device(offsets))
for g, w in zip(got, want):
    assert g.dtype == np.float64 and not isinstance(g, np.ndarray)
    np.testing.assert_allclose(g.copy_to_host(), w, rtol=1e-12, atol=1e-12)
assert "cast_single_k" in launched  # k widened on the device
assert not [c for c in copied if c[0] in ((2, 2, 40, 5), (2, 2, 40, 3))], copied  # no input went to the host

# a NaN in the last of 800 elements: the count's single warp steps over all of them
bad = k.copy()
bad[-1, -1, -1, -1] = np.nan
try:
    fsat.sparse_attention(cuda.to_device(k), cuda.to_device(bad), cuda.to_device(v), cuda.to_device(offsets))
except ValueError as error:
    assert str(error) == "k: expected finite values, got 1 NaN or Inf entries", error
else:
    raise AssertionError("no error for a NaN in k")
print("device inputs as expected")
"""


def test_device_inputs_are_converted_on_the_device_and_counted_whole():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "device inputs as expected" in done.stdout
