"""Routing steps 4-6 of the Numba-CUDA backend: cluster attention, combine, local attention.

The validation tests compare exception types and messages with the reference; validation happens
before any launch, so they run on any machine (no device, no simulator). The kernel tests run in a
subprocess with NUMBA_ENABLE_CUDASIM=1 (the simulator must be on before numba is imported) and cover
what the conformance grid does not reach: several tiles of queries and keys (W > TILE, the online
softmax across tiles), feature chunks (D, Dv > CHUNK), empty slots and rows without keys, int32
members, device arrays in and out, and the same messages for device inputs.
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

import refattn.routing as reference  # noqa: E402
from refattn.backends.numba_cuda import routing as backend  # noqa: E402

rng = np.random.default_rng(0)
B, H, L, D, DV, C, W = 2, 2, 5, 3, 2, 2, 3
q = rng.standard_normal((B, H, L, D))
k = rng.standard_normal((B, H, L, D))
v = rng.standard_normal((B, H, L, DV))
qm = np.broadcast_to(np.array([[0, 2, 4], [1, 2, -1]]), (B, H, C, W)).copy()
km = np.broadcast_to(np.array([[1, 3, 4], [0, 2, 3]]), (B, H, C, W)).copy()
do = rng.standard_normal((B, H, C, W, DV))
o = rng.standard_normal((B, H, C, W, DV))
dout = rng.standard_normal((B, H, L, DV))
mask = np.zeros((B, L), dtype=bool)
mask[0, -1] = True


def _with(array: np.ndarray, index: tuple, value: float) -> np.ndarray:
    changed = array.copy()
    changed[index] = value
    return changed


def _cluster(ns, *, qm=qm, km=km, q=q, k=k, v=v, **options):
    return ns.cluster_attention(q, k, v, qm, km, **options)


CASES = {
    # cluster_attention: q, k, v
    "cluster int q": lambda ns: _cluster(ns, q=q.astype(int)),
    "cluster q rank": lambda ns: _cluster(ns, q=q[0]),
    "cluster q nan": lambda ns: _cluster(ns, q=_with(q, (0, 0, 0, 0), np.nan)),
    "cluster q empty axis": lambda ns: _cluster(ns, q=q[..., :0], k=k[..., :0]),
    "cluster k length": lambda ns: _cluster(ns, k=k[:, :, :2]),
    "cluster k feature": lambda ns: _cluster(ns, k=k[..., :2]),
    "cluster k inf": lambda ns: _cluster(ns, k=_with(k, (1, 1, 1, 1), -np.inf)),
    "cluster v length": lambda ns: _cluster(ns, v=v[:, :, :3]),
    "cluster v heads": lambda ns: _cluster(ns, v=v[:, :1]),
    "cluster v float16 nan": lambda ns: _cluster(ns, v=_with(v, (0, 0, 0, 0), np.nan).astype(np.float16)),
    # configuration
    "cluster k with shared_qk": lambda ns: _cluster(ns, shared_qk=True),
    "cluster no k unshared": lambda ns: _cluster(ns, k=None),
    "cluster lucidrains causal unshared": lambda ns: _cluster(ns, causal=True, profile="lucidrains"),
    "cluster unknown profile": lambda ns: _cluster(ns, profile="tf"),
    # members
    "cluster q_members float": lambda ns: _cluster(ns, qm=qm.astype(float)),
    "cluster q_members bool": lambda ns: _cluster(ns, qm=qm > 0),
    "cluster q_members rank": lambda ns: _cluster(ns, qm=qm[0]),
    "cluster q_members batch": lambda ns: _cluster(ns, qm=qm[:1]),
    "cluster q_members heads": lambda ns: _cluster(ns, qm=qm[:, :1]),
    "cluster q_members empty window": lambda ns: _cluster(ns, qm=qm[..., :0]),
    "cluster q_members too large": lambda ns: _cluster(ns, qm=_with(qm, (0, 0, 0, 0), L)),
    "cluster q_members below -1": lambda ns: _cluster(ns, qm=_with(qm, (1, 1, 1, 1), -2)),
    "cluster q_members repeated": lambda ns: _cluster(ns, qm=_with(qm, (0, 1, 0, 1), 0)),
    "cluster k_members repeated": lambda ns: _cluster(ns, km=_with(km, (0, 0, 1, 2), 0)),
    "cluster k_members float": lambda ns: _cluster(ns, km=km.astype(np.float32)),
    "cluster k_members clusters": lambda ns: _cluster(ns, km=km[:, :, :1]),
    "cluster k_members too large": lambda ns: _cluster(ns, km=km + 2),
    # cluster_attention_vjp
    "cluster_vjp do shape": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, do[..., :1]),
    "cluster_vjp do window": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, do[:, :, :, :2]),
    "cluster_vjp do rank": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, do[0]),
    "cluster_vjp do int": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, do.astype(int)),
    "cluster_vjp do None": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, None),
    "cluster_vjp do nan": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, _with(do, (0, 0, 0, 0, 0), np.nan)),
    "cluster_vjp shared with k": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, qm, do, shared_qk=True),
    "cluster_vjp lucidrains causal": lambda ns: ns.cluster_attention_vjp(q, k, v, qm, km, do, causal=True,
                                                                         profile="lucidrains"),
    # combine
    "combine length 0": lambda ns: ns.combine(o, qm, 0),
    "combine length float": lambda ns: ns.combine(o, qm, 5.0),
    "combine length bool": lambda ns: ns.combine(o, qm, True),
    "combine o int": lambda ns: ns.combine(o.astype(int), qm, L),
    "combine o rank": lambda ns: ns.combine(o[0], qm, L),
    "combine o inf": lambda ns: ns.combine(_with(o, (1, 1, 1, 1, 1), np.inf), qm, L),
    "combine members window": lambda ns: ns.combine(o[:, :, :, :2], qm, L),
    "combine members clusters": lambda ns: ns.combine(o[:, :, :1], qm, L),
    "combine members heads": lambda ns: ns.combine(o[:, :1], qm, L),
    "combine members beyond length": lambda ns: ns.combine(o, qm, 3),
    "combine members float": lambda ns: ns.combine(o, qm.astype(float), L),
    "combine profile": lambda ns: ns.combine(o, qm, L, profile="TACL"),
    # combine_vjp
    "combine_vjp dout rank": lambda ns: ns.combine_vjp(qm, dout[0]),
    "combine_vjp dout int": lambda ns: ns.combine_vjp(qm, dout.astype(np.int32)),
    "combine_vjp dout nan": lambda ns: ns.combine_vjp(qm, _with(dout, (0, 1, 2, 1), np.nan)),
    "combine_vjp members batch": lambda ns: ns.combine_vjp(qm[:1], dout),
    "combine_vjp members beyond length": lambda ns: ns.combine_vjp(qm, dout[:, :, :3]),
    "combine_vjp members repeated": lambda ns: ns.combine_vjp(_with(qm, (0, 0, 0, 2), 0), dout),
    "combine_vjp profile": lambda ns: ns.combine_vjp(qm, dout, profile=None),
    # local_attention
    "local int q": lambda ns: ns.local_attention(q.astype(int), k, v, 2),
    "local q rank": lambda ns: ns.local_attention(q[0], k, v, 2),
    "local q empty length": lambda ns: ns.local_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], 2),
    "local k feature": lambda ns: ns.local_attention(q, k[..., :1], v, 2),
    "local k nan": lambda ns: ns.local_attention(q, _with(k, (0, 0, 0, 0), np.nan), v, 2),
    "local v length": lambda ns: ns.local_attention(q, k, v[:, :, :4], 2),
    "local block 0": lambda ns: ns.local_attention(q, k, v, 0),
    "local block float": lambda ns: ns.local_attention(q, k, v, 2.0),
    "local block bool": lambda ns: ns.local_attention(q, k, v, True),
    "local mask dtype": lambda ns: ns.local_attention(q, k, v, 2, key_padding_mask=mask.astype(int)),
    "local mask shape": lambda ns: ns.local_attention(q, k, v, 2, key_padding_mask=mask[:, :4]),
    "local mask batch": lambda ns: ns.local_attention(q, k, v, 2, key_padding_mask=mask[:1]),
    # local_attention_vjp
    "local_vjp dout shape": lambda ns: ns.local_attention_vjp(q, k, v, 2, dout[..., :1]),
    "local_vjp dout None": lambda ns: ns.local_attention_vjp(q, k, v, 2, None),
    "local_vjp dout rank": lambda ns: ns.local_attention_vjp(q, k, v, 2, dout[0]),
    "local_vjp dout inf": lambda ns: ns.local_attention_vjp(q, k, v, 2, _with(dout, (1, 0, 0, 0), np.inf)),
    "local_vjp block": lambda ns: ns.local_attention_vjp(q, k, v, -1, dout),
    "local_vjp mask": lambda ns: ns.local_attention_vjp(q, k, v, 2, dout, key_padding_mask=mask[None]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_error_as_the_reference(name):
    call = CASES[name]
    with pytest.raises((TypeError, ValueError)) as expected:
        call(reference)
    with pytest.raises(type(expected.value)) as got:
        call(backend)
    assert str(got.value) == str(expected.value)


def test_the_routing_namespace_has_the_reference_functions():
    assert set(backend.__all__) == set(reference.__all__)
    for name in reference.__all__:
        assert callable(getattr(backend, name)), name


# ---------------------------------------------------------------- kernels, in the CUDA simulator

PRELUDE = """
import numpy as np
from numba import cuda
import refattn.routing as ref
from refattn.backends.numba_cuda import routing as nc

FORWARD = dict(rtol=1e-9, atol=1e-11)  # spec/interface.md, float64
GRADIENT = dict(rtol=1e-8, atol=1e-10)


def host(x):
    return x if x is None or isinstance(x, np.ndarray) else x.copy_to_host()


def same(got, want, tolerance):
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_allclose(host(g), w, **tolerance)


def members(rng, batch, heads, clusters, window, length, empty=0):
    # distinct positions per cluster, sorted, with ``empty`` trailing -1 slots (as route makes them)
    out = np.full((batch, heads, clusters, window), -1, dtype=np.int64)
    for index in np.ndindex(batch, heads, clusters):
        out[index][: window - empty] = np.sort(rng.choice(length, window - empty, replace=False))
    return out
"""


def _simulate(code: str) -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    path = f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    done = subprocess.run([sys.executable, "-c", path + PRELUDE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_cluster_attention_across_query_and_key_tiles():
    """W > TILE (two tiles of queries and keys: the online softmax across tiles, the atomics of
    overlapping clusters), empty slots, both profiles, causal and shared QK, forward and VJP."""
    _simulate("""
        rng = np.random.default_rng(1)
        batch, heads, length, dim, dim_v, clusters = 1, 1, 40, 2, 1, 2
        q, k = rng.standard_normal((2, batch, heads, length, dim))
        v = rng.standard_normal((batch, heads, length, dim_v))
        qm = members(rng, batch, heads, clusters, 35, length, empty=1)
        km = members(rng, batch, heads, clusters, 34, length, empty=1)
        do = rng.standard_normal(qm.shape + (dim_v,))
        for profile, causal, shared in (("tacl", True, False), ("lucidrains", True, True), ("tacl", False, True)):
            keys = qm if shared else km
            args = (q, None if shared else k, v, qm, keys)
            options = dict(causal=causal, shared_qk=shared, profile=profile)
            same(nc.cluster_attention(*args, **options), ref.cluster_attention(*args, **options), FORWARD)
            same(nc.cluster_attention_vjp(*args, do, **options), ref.cluster_attention_vjp(*args, do, **options),
                 GRADIENT)
    """)


def test_cluster_attention_feature_chunks_and_edge_rows():
    """D, Dv > CHUNK; Wq != Wk; a query whose keys all lie after it (causal, unshared: o = 0, no
    gradient); an empty query slot (o = 0 whatever); lucidrains causal shared: the first member of a
    cluster sees only itself; int32 members give the same result."""
    _simulate("""
        rng = np.random.default_rng(2)
        length, dim, dim_v = 6, 33, 34
        q, k = rng.standard_normal((2, 1, 1, length, dim))
        v = rng.standard_normal((1, 1, length, dim_v))
        qm = np.array([[[[0, 3, -1], [2, 4, 5]]]])
        km = np.array([[[[1, 2], [0, 5]]]])
        do = rng.standard_normal(qm.shape + (dim_v,))
        o = nc.cluster_attention(q, k, v, qm, km, causal=True)
        same(o, ref.cluster_attention(q, k, v, qm, km, causal=True), FORWARD)
        assert np.all(o[0, 0, 0, 0] == 0) and np.all(o[0, 0, 0, 2] == 0)  # no valid key; empty slot
        grads = nc.cluster_attention_vjp(q, k, v, qm, km, do, causal=True)
        same(grads, ref.cluster_attention_vjp(q, k, v, qm, km, do, causal=True), GRADIENT)
        assert np.all(grads[0][0, 0, 1] == 0)  # position 1 is in no query list
        same(nc.cluster_attention(q, k, v, qm.astype(np.int32), km.astype(np.int32), causal=True), o, FORWARD)

        shared = nc.cluster_attention(q, None, v, qm, qm, causal=True, shared_qk=True, profile="lucidrains")
        same(shared, ref.cluster_attention(q, None, v, qm, qm, causal=True, shared_qk=True, profile="lucidrains"),
             FORWARD)
        np.testing.assert_allclose(shared[0, 0, 0, 0], v[0, 0, 0], rtol=1e-12)  # first member: itself only
        same(nc.cluster_attention_vjp(q, None, v, qm, qm, do, causal=True, shared_qk=True, profile="lucidrains"),
             ref.cluster_attention_vjp(q, None, v, qm, qm, do, causal=True, shared_qk=True, profile="lucidrains"),
             GRADIENT)
    """)


def test_device_arrays_stay_on_the_device_and_float32_stays_float32():
    """Device inputs give device results (no copy back); float32 is computed and returned in float32
    (within the float32 tolerances of the float64 reference); combine_vjp of a sliced device array."""
    _simulate("""
        rng = np.random.default_rng(3)
        batch, heads, length, dim, dim_v, clusters, window = 2, 2, 7, 3, 2, 3, 3
        q, k = rng.standard_normal((2, batch, heads, length, dim))
        v = rng.standard_normal((batch, heads, length, dim_v))
        dout = rng.standard_normal((batch, heads, length, dim_v + 2))
        qm = members(rng, batch, heads, clusters, window, length, empty=1)
        km = members(rng, batch, heads, clusters, window, length)
        F32 = dict(rtol=1e-4, atol=1e-5)
        G32 = dict(rtol=1e-3, atol=1e-4)
        d = {name: cuda.to_device(x.astype(np.float32)) for name, x in dict(q=q, k=k, v=v, dout=dout).items()}
        r = {name: x.copy_to_host().astype(np.float64) for name, x in d.items()}
        dqm, dkm = cuda.to_device(qm), cuda.to_device(km)
        o = nc.cluster_attention(d["q"], d["k"], d["v"], dqm, dkm, profile="lucidrains")
        assert hasattr(o, "copy_to_host") and o.dtype == np.float32, type(o)
        same(o, ref.cluster_attention(r["q"], r["k"], r["v"], qm, km, profile="lucidrains"), F32)
        out = nc.combine(o, dqm, length, profile="lucidrains")
        assert hasattr(out, "copy_to_host") and out.dtype == np.float32
        same(out, ref.combine(host(o).astype(np.float64), qm, length, profile="lucidrains"), F32)
        sliced = d["dout"][..., :dim_v]  # a non-contiguous view
        do = nc.combine_vjp(dqm, sliced)
        assert hasattr(do, "copy_to_host") and do.dtype == np.float32
        same(do, ref.combine_vjp(qm, r["dout"][..., :dim_v]), G32)
        grads = nc.cluster_attention_vjp(d["q"], d["k"], d["v"], dqm, dkm, do)
        assert all(hasattr(g, "copy_to_host") and g.dtype == np.float32 for g in grads)
        same(grads, ref.cluster_attention_vjp(r["q"], r["k"], r["v"], qm, km, host(do).astype(np.float64)), G32)
        local = nc.local_attention(d["q"], d["k"], d["v"], 2, causal=True)
        assert hasattr(local, "copy_to_host") and local.dtype == np.float32
        same(local, ref.local_attention(r["q"], r["k"], r["v"], 2, causal=True), F32)
        # mixed float32 and float64 inputs compute in float64
        mixed = nc.local_attention(q, d["k"], d["v"], 2)
        assert mixed.dtype == np.float64
        same(mixed, ref.local_attention(q, r["k"], r["v"], 2), FORWARD)
    """)


def test_local_attention_tiles_blocks_and_padding():
    """L > TILE with blocks smaller than, larger than and not dividing the tile, block >= L, padding
    (padded queries give zero rows), causal or not: forward and VJP."""
    _simulate("""
        rng = np.random.default_rng(4)
        batch, heads, length, dim, dim_v = 1, 1, 40, 2, 1
        q, k = rng.standard_normal((2, batch, heads, length, dim))
        v = rng.standard_normal((batch, heads, length, dim_v))
        dout = rng.standard_normal((batch, heads, length, dim_v))
        mask = np.zeros((batch, length), dtype=bool)
        mask[0, 5:15] = True  # with block 5: blocks 1 and 2 are all padding
        for block, causal, padding in ((3, False, None), (5, True, mask), (33, False, mask), (50, True, None)):
            options = dict(causal=causal, key_padding_mask=padding)
            out = nc.local_attention(q, k, v, block, **options)
            same(out, ref.local_attention(q, k, v, block, **options), FORWARD)
            same(nc.local_attention_vjp(q, k, v, block, dout, **options),
                 ref.local_attention_vjp(q, k, v, block, dout, **options), GRADIENT)
            if padding is not None:
                assert np.all(out[0, 0, 5:15] == 0)
    """)


def test_device_inputs_give_the_reference_messages():
    """Validation reads metadata (and the small member and mask arrays), so device inputs fail with
    the same exception and message as NumPy inputs to the reference."""
    _simulate("""
        from test_numba_cuda_cluster_attention import CASES
        from refattn.backends.numba_cuda import routing as backend

        def device(ns):
            class Wrapped:
                def __getattr__(self, name):
                    def call(*args, **kwargs):
                        move = lambda x: cuda.to_device(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
                        return getattr(ns, name)(*map(move, args), **{n: move(x) for n, x in kwargs.items()})
                    return call
            return Wrapped()

        for name, call in sorted(CASES.items()):
            expected = None
            try:
                call(ref)
            except (TypeError, ValueError) as error:
                expected = error
            try:
                call(device(backend))
            except (TypeError, ValueError) as error:
                assert type(error) is type(expected) and str(error) == str(expected), (name, error, expected)
            else:
                raise AssertionError(f"{name}: no error with device inputs")
    """)
