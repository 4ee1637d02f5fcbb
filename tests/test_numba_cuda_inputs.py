"""Host-side validation of the Numba-CUDA backend: the same exceptions and messages as the reference.

Validation happens before any kernel launch, so these run on any machine (no device, no simulator).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

import refattn.fsat as reference  # noqa: E402
import refattn.routing as routing_reference  # noqa: E402
from refattn.backends.numba_cuda import fsat, routing  # noqa: E402

rng = np.random.default_rng(0)
B, H, L, D = 2, 2, 4, 3
q = rng.standard_normal((B, H, L, D))
k = rng.standard_normal((B, H, L, D))
v = rng.standard_normal((B, H, L, D))
w = np.ones((H, D))
s = rng.standard_normal((B, H, 2 * L - 1))
c = rng.standard_normal((B, H, 2 * L - 1, D))
offsets = np.array([-1, 0, 2])[None, None, :].repeat(B, 0).repeat(H, 1)
nan_q = q.copy()
nan_q[0, 0, 0, 0] = np.nan
bad_s = s.copy()
bad_s[0, 0, 0] = np.inf
neg_s = s.copy()
neg_s[0, 0, 0] = -np.inf

CASES = {
    "int q": lambda ns: ns.sparse_attention(q.astype(int), k, v, offsets),
    "q rank": lambda ns: ns.sparse_attention(q[0], k, v, offsets),
    "q nan": lambda ns: ns.sparse_attention(nan_q, k, v, offsets),
    "k shape": lambda ns: ns.sparse_attention(q, k[:, :, :2], v, offsets),
    "v length": lambda ns: ns.sparse_attention(q, k, v[:, :, :3], offsets),
    "offsets float": lambda ns: ns.sparse_attention(q, k, v, offsets.astype(float)),
    "offsets range": lambda ns: ns.sparse_attention(q, k, v, offsets * 5),
    "offsets repeated": lambda ns: ns.sparse_attention(q, k, v, np.zeros((B, H, 2), dtype=np.int64)),
    "offsets empty": lambda ns: ns.sparse_attention(q, k, v, np.zeros((B, H, 0), dtype=np.int64)),
    "bias +inf": lambda ns: ns.sparse_attention(q, k, v, offsets, np.full((B, H, 3), np.inf)),
    "bias shape": lambda ns: ns.sparse_attention(q, k, v, offsets, np.zeros((B, H, 2))),
    "mask dtype": lambda ns: ns.sparse_attention(q, k, v, offsets, key_padding_mask=np.zeros((B, L))),
    "mask shape": lambda ns: ns.sparse_attention(q, k, v, offsets, key_padding_mask=np.zeros((B, L + 1), bool)),
    "dout shape": lambda ns: ns.sparse_attention_vjp(q, k, v, offsets, None, v[..., :2]),
    "dlse shape": lambda ns: ns.sparse_attention_vjp(q, k, v, offsets, None, v, dlse=np.zeros((B, H))),
    "cross b shape": lambda ns: ns.cross(q, k[:, :1]),
    "cross dc shape": lambda ns: ns.cross_vjp(q, k, c[:, :, :3]),
    "estimate even": lambda ns: ns.estimate(c[:, :, :6], w),
    "estimate w": lambda ns: ns.estimate(c, w[:1]),
    "estimate ds": lambda ns: ns.estimate_vjp(c, w, s[:, :1]),
    "select +inf": lambda ns: ns.select(bad_s, 2),
    "select top_k 0": lambda ns: ns.select(s, 0),
    "select top_k float": lambda ns: ns.select(s, 2.0),
    "select noise shape": lambda ns: ns.select(s, 2, noise=s[:, :1]),
    "select noise -inf": lambda ns: ns.select(s, 2, noise=neg_s),
    "pair_counts length": lambda ns: ns.pair_counts(0),
    "pair_counts mask": lambda ns: ns.pair_counts(L, np.zeros((B, L), int)),
    "attention cross_q only": lambda ns: ns.attention(q, k, v, w, 2, cross_q=q),
    "attention w shape": lambda ns: ns.attention(q, k, v, w[:, :2], 2),
    "attention top_k": lambda ns: ns.attention(q, k, v, w, 0),
    "attention noise": lambda ns: ns.attention(q, k, v, w, 2, noise=s[:, :, :3]),
    "attention_vjp dout": lambda ns: ns.attention_vjp(q, k, v, w, 2, q[..., :1, :]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_error_as_the_reference(name):
    call = CASES[name]
    with pytest.raises((TypeError, ValueError)) as expected:
        call(reference)
    with pytest.raises(type(expected.value)) as got:
        call(fsat)
    assert str(got.value) == str(expected.value)


# The routing pipeline's own checks (the steps' are in test_numba_cuda_clustering.py and
# test_numba_cuda_cluster_attention.py), in the reference's order: a call with several faults
# must name the same first one.
mu = rng.standard_normal((H, 2, D))
ROUTING_CASES = {
    "attention profile": lambda ns: ns.attention(q, k, v, mu, profile="vanilla"),
    "attention k with shared": lambda ns: ns.attention(q, k, v, mu, shared_qk=True),
    "attention lucidrains causal": lambda ns: ns.attention(q, k, v, mu, causal=True, profile="lucidrains"),
    "attention q nan": lambda ns: ns.attention(nan_q, k, v, mu),
    "attention v length": lambda ns: ns.attention(q, k, v[:, :, :3], mu),
    "attention centroids heads": lambda ns: ns.attention(q, k, v, mu[:1]),
    "attention centroids dim": lambda ns: ns.attention(q, k, v, mu[..., :2]),
    "attention window 0": lambda ns: ns.attention(q, k, v, mu, window=0),
    "attention window above L": lambda ns: ns.attention(q, k, v, mu, window=L + 1),
    "attention mask shape": lambda ns: ns.attention(q, k, v, mu, key_padding_mask=np.zeros((B, L + 1), bool)),
    "attention window and mask": lambda ns: ns.attention(q, k, v, mu, window=0, key_padding_mask=np.zeros(L)),
    "attention_vjp dout shape": lambda ns: ns.attention_vjp(q, k, v, mu, v[..., :2]),
    "attention_vjp dout nan": lambda ns: ns.attention_vjp(q, k, v, mu, nan_q),
    "attention_vjp v before dout": lambda ns: ns.attention_vjp(q, k, v[:, :1], mu, q[0]),
}


@pytest.mark.parametrize("name", sorted(ROUTING_CASES))
def test_routing_pipeline_same_error_as_the_reference(name):
    call = ROUTING_CASES[name]
    with pytest.raises((TypeError, ValueError)) as expected:
        call(routing_reference)
    with pytest.raises(type(expected.value)) as got:
        call(routing)
    assert str(got.value) == str(expected.value)


def test_results_follow_the_kind_of_the_device_input(monkeypatch):
    """CuPy in, CuPy out; torch in, torch out (views through __cuda_array_interface__); Numba device
    arrays stay Numba device arrays. Checked on stand-ins: no device is needed to pick the kind."""
    import sys
    import types

    from refattn.backends.numba_cuda import runtime

    fake_cupy = types.ModuleType("cupy")
    fake_cupy.asarray = lambda array: ("cupy view of", array)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    cupy_array = type("ndarray", (), {"__module__": "cupy._core.core", "__cuda_array_interface__": {}})()
    assert runtime.result_kind(cupy_array)("result") == ("cupy view of", "result")

    torch = pytest.importorskip("torch")
    seen = {}
    monkeypatch.setattr(torch, "as_tensor", lambda array, device: seen.setdefault("call", (array, device)))
    tensor_like = type("Tensor", (), {"__module__": "torch", "device": "cuda:1", "__cuda_array_interface__": {}})()
    runtime.result_kind(tensor_like)("result")
    assert seen["call"] == ("result", "cuda:1")

    numba_array = type("DeviceNDArray", (), {"__module__": "numba.cuda.cudadrv.devicearray"})()
    assert runtime.result_kind(numba_array)("result") == "result"


class TensorRequiringGrad:
    """A stand-in for a CUDA tensor with requires_grad: torch refuses its __cuda_array_interface__."""

    __module__ = "torch"
    requires_grad = True
    shape = (B, H, L, D)

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")


@pytest.mark.parametrize("call, name", [
    (lambda: fsat.sparse_attention(q, TensorRequiringGrad(), v, offsets), "k"),
    (lambda: fsat.attention(TensorRequiringGrad(), k, v, w, 2), "q"),
    (lambda: routing.attention(q, k, TensorRequiringGrad(), mu), "v"),
])
def test_a_tensor_that_requires_grad_is_a_type_error_naming_it(call, name):
    """Not torch's RuntimeError from inside the bridge: the backend has no autograd, so say so."""
    with pytest.raises(TypeError, match=rf"^{name}: expected a tensor without autograd, got one that requires grad"):
        call()
