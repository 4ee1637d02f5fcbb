"""The CuPy backend on a CUDA device: the conformance suite unchanged, and zero-copy interchange.

Skipped, with the reason, on machines without a CUDA device (these tests have never run in this
project's CI, which has no GPU).
"""

from __future__ import annotations

import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

import cupy

from refattn import backends

_BACKEND = backends.get_backend("cupy")
pytestmark = pytest.mark.skipif(not _BACKEND.capabilities.devices,
                                reason=f"CuPy backend: {_BACKEND.capabilities.unavailable}")


def test_conformance_suite_passes_on_the_gpu():
    from refattn.conformance import runner

    results = runner.check_backend("cupy")
    failures = [f"{r.algorithm}.{r.function} {r.dtype} {r.case}: {r.detail}" for r in results if r.status == "fail"]
    assert not failures, "\n".join(failures[:50])
    assert any(r.status == "pass" for r in results)


def test_zero_copy_with_torch_and_numba():
    import numpy as np

    fsat = _BACKEND.fsat
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((1, 2, 6, 4)), dtype=cupy.float32)
    offsets = cupy.asarray(np.tile([-1, 0, 2], (1, 2, 1)))
    out, _ = fsat.sparse_attention(q, q, q, offsets)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        tensor = torch.from_dlpack(out)
        assert tensor.data_ptr() == out.data.ptr
        again, _ = fsat.sparse_attention(torch.from_dlpack(q), q, q, offsets)  # a CUDA tensor in, via DLPack/CAI
        cupy.testing.assert_allclose(again, out)
    numba_cuda = pytest.importorskip("numba.cuda")
    view = numba_cuda.as_cuda_array(out)
    assert view.__cuda_array_interface__["data"][0] == out.data.ptr
