"""The Numba-CUDA FSAT kernels at shapes the conformance grid's tiny ones do not reach (in the CUDA
simulator): several lanes per row, several feature chunks of q and k, several output blocks of v, a
partial last tile; the selection's radix path on long rows with deliberate ties; the dw reduction over
several parts."""

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
import refattn.fsat as reference
from refattn.backends.numba_cuda import fsat
from refattn.backends.numba_cuda.fsat.sparse_attention import CHUNK, RES, tile_launch

rng = np.random.default_rng(1)
L, D, DV = 20, 2 * CHUNK + 2, RES + 72  # three chunks of q and k, two output blocks of v
assert tile_launch(1, L, DV, 8) == (2, (8, 16))  # eight lanes, 16 rows: a partial last tile
q, k = 0.3 * rng.standard_normal((2, 1, 1, L, D))
v, dout = rng.standard_normal((2, 1, 1, L, DV))
offsets = np.array([[[-5, 2, 17]]])
bias = rng.standard_normal((1, 1, 3))
bias[0, 0, 1] = -np.inf
mask = np.zeros((1, L), bool)
mask[0, 3] = mask[0, 18] = True
for causal in (False, True):
    got = fsat.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    want = reference.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)
    dlse = rng.standard_normal((1, 1, L))
    got = fsat.sparse_attention_vjp(q, k, v, offsets, bias, dout, dlse=dlse, causal=causal, key_padding_mask=mask)
    want = reference.sparse_attention_vjp(q, k, v, offsets, bias, dout, dlse=dlse, causal=causal,
                                          key_padding_mask=mask)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11)
print("sparse attention ok")

# select on rows of 2L - 2 = 598 candidates (the radix path), with ties across the K-th place
s = np.round(rng.standard_normal((1, 1, 599)), 1)
noise = np.zeros_like(s)
for causal, top_k in ((False, 9), (True, 1), (True, 200)):
    got = fsat.select(s.astype(np.float32), top_k, causal=causal, noise=noise.astype(np.float32))
    want = reference.select(s.astype(np.float32).astype(np.float64), top_k, causal=causal)
    assert np.array_equal(got, want), (causal, top_k)
print("select ok")
"""


def test_sparse_attention_tiles_and_long_selection_rows():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "select ok" in done.stdout


DW_PARTS = """
import numpy as np
import refattn.fsat as reference
from refattn.backends.numba_cuda import fsat
from refattn.backends.numba_cuda.fsat.estimate import dw_launch

rng = np.random.default_rng(2)
L, D = 150, 17
assert dw_launch(1, 2 * L - 1, 1, D) == (3, (32, 8), 3)  # 299 (b, tau) items: three parts of rows 8 x lanes 32
c, w = rng.standard_normal((1, 1, 2 * L - 1, D)), rng.standard_normal((1, D))
ds = rng.standard_normal((1, 1, 2 * L - 1))
mask = np.zeros((1, L), bool)
mask[0, 120:] = True  # offsets beyond +-119 have no pairs: skipped in every part
for got, want in zip(fsat.estimate_vjp(c, w, ds, key_padding_mask=mask),
                     reference.estimate_vjp(c, w, ds, key_padding_mask=mask)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
print("dw ok")
"""


def test_the_dw_reduction_over_several_parts():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(DW_PARTS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "dw ok" in done.stdout
