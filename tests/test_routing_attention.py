"""routing.cluster_attention + combine, routing.attention and routing.local_attention against the
naive oracles (brute force over co-membership; dense L x L local attention)."""

import importlib
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import routing
from refattn.conformance.oracles import routing as oracle

RTOL, ATOL = 1e-12, 1e-13
CONFIGS = [  # (profile, causal, shared_qk): every supported combination
    ("tacl", False, False),
    ("tacl", False, True),
    ("tacl", True, False),
    ("tacl", True, True),
    ("lucidrains", False, False),
    ("lucidrains", False, True),
    ("lucidrains", True, True),
]


def random_members(rng, batch, heads, length, clusters, window, mask=None, empty=0.2):
    """Random distinct positions per cluster (sorted), some slots -1 at the end; padding never a member."""
    members = np.full((batch, heads, clusters, window), -1, dtype=np.int64)
    for b, h, c in np.ndindex(batch, heads, clusters):
        pool = np.arange(length) if mask is None else np.flatnonzero(~mask[b])
        size = min(window, pool.size)
        if rng.random() < empty:
            size = int(rng.integers(0, size + 1))
        members[b, h, c, :size] = np.sort(rng.choice(pool, size=size, replace=False))
    return members


def qkv(rng, batch, heads, length, dim, dv, scale=1.0):
    q, k = scale * rng.standard_normal((2, batch, heads, length, dim))
    return q, k, rng.standard_normal((batch, heads, length, dv))


@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_cluster_attention_and_combine_match_the_brute_force_oracle(profile, causal, shared, padded):
    rng = np.random.default_rng(zlib.crc32(repr((profile, causal, shared, padded)).encode()))
    batch, heads, length, dim, dv, clusters, window = 2, 2, 11, 3, 4, 4, 5
    q, k, v = qkv(rng, batch, heads, length, dim, dv, scale=2.0)
    mask = rng.random((batch, length)) < 0.3 if padded else None
    qm = random_members(rng, batch, heads, length, clusters, window, mask)
    km = qm if shared else random_members(rng, batch, heads, length, clusters, window, mask)
    kk = None if shared else k
    o = routing.cluster_attention(q, kk, v, qm, km, causal=causal, shared_qk=shared, profile=profile)
    assert o.shape == (batch, heads, clusters, window, dv) and o.dtype == np.float64
    out = routing.combine(o, qm, length, profile=profile)
    expected = oracle.routed_attention(q, kk, v, qm, km, causal=causal, shared_qk=shared, profile=profile)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    counts = np.zeros((batch, heads, length))
    for b, h, c, w in np.ndindex(qm.shape):
        if qm[b, h, c, w] >= 0:
            counts[b, h, qm[b, h, c, w]] += 1
    assert np.any(counts == 0) and np.any(counts > 1)  # uncovered and multi-member tokens both occur
    assert np.all(out[counts == 0] == 0)
    assert np.all(o[qm < 0] == 0)  # empty query slots


def test_a_token_in_one_cluster_gets_o_over_one_plus_eps():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 1, 4, 2, 3)
    members = np.array([[[[0, 1, 2, 3]]]])
    for profile, eps in (("tacl", 1e-2), ("lucidrains", 1e-5)):
        o = routing.cluster_attention(q, k, v, members, members, profile=profile)
        np.testing.assert_allclose(routing.combine(o, members, 4, profile=profile)[0, 0], o[0, 0, 0] / (1 + eps),
                                   rtol=1e-15)


def test_tacl_logits_are_layernormed_unscaled_and_lucidrains_raw_scaled():
    q = np.array([[[[1.0, 2.0, 4.0], [0.5, -1.0, 3.0]]]])
    k = np.array([[[[2.0, 0.0, 1.0], [-1.0, 1.0, 2.0]]]])
    v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    m = np.array([[[[0, 1]]]])

    def ln(x):
        return (x - x.mean()) / np.sqrt(x.var() + 1e-6)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    o = routing.cluster_attention(q, k, v, m, m, profile="tacl")[0, 0, 0]
    for i in range(2):
        z = [ln(q[0, 0, i]) @ ln(k[0, 0, j]) for j in range(2)]
        np.testing.assert_allclose(o[i], softmax(np.array(z)), rtol=1e-14)
    o = routing.cluster_attention(q, k, v, m, m, profile="lucidrains")[0, 0, 0]
    for i in range(2):
        z = [q[0, 0, i] @ k[0, 0, j] / np.sqrt(3) for j in range(2)]
        np.testing.assert_allclose(o[i], softmax(np.array(z)), rtol=1e-14)
    # lucidrains, shared QK: keys are q / ||q||, the self logit is -5e4
    o = routing.cluster_attention(q, None, v, m, m, shared_qk=True, profile="lucidrains")[0, 0, 0]
    np.testing.assert_allclose(o, [[0.0, 1.0], [1.0, 0.0]], atol=1e-300)


def test_a_query_with_no_valid_key_outputs_zero():
    # causal, unshared: the cluster's only key lies after the query
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 1, 5, 2, 3)
    qm = np.array([[[[0, 3]]]])
    km = np.array([[[[2, -1]]]])
    o = routing.cluster_attention(q, k, v, qm, km, causal=True)
    assert np.all(o[0, 0, 0, 0] == 0)
    np.testing.assert_allclose(o[0, 0, 0, 1], v[0, 0, 2], rtol=1e-15)


def test_lucidrains_rejects_causal_unshared():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 1, 4, 2, 2)
    with pytest.raises(ValueError, match="memory key/values"):
        routing.attention(q, k, v, np.ones((1, 2, 2)), causal=True, profile="lucidrains")


@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
@pytest.mark.parametrize("length,clusters,window", [(1, 1, None), (2, 3, 1), (13, 3, None), (16, 4, 6), (9, 5, 9)])
def test_attention_matches_the_oracle_pipeline(profile, causal, shared, length, clusters, window):
    rng = np.random.default_rng(length * 31 + clusters)
    q, k, v = qkv(rng, 2, 2, length, 5, 3)
    mu = rng.standard_normal((2, clusters, 5))
    kk = None if shared else k
    out = routing.attention(q, kk, v, mu, window=window, causal=causal, shared_qk=shared, profile=profile)
    expected = oracle.attention(q, kk, v, mu, window=window, causal=causal, shared_qk=shared, profile=profile)
    assert out.shape == v.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
def test_attention_with_padding(profile, causal, shared):
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 3, 2, 10, 4, 3)
    mu = rng.standard_normal((2, 3, 4))
    mask = rng.random((3, 10)) < 0.4
    mask[1] = True  # an all-padded batch element
    mask[2, :8] = True  # fewer unpadded tokens than W
    kk = None if shared else k
    kwargs = dict(window=4, causal=causal, shared_qk=shared, profile=profile, key_padding_mask=mask)
    out = routing.attention(q, kk, v, mu, **kwargs)
    np.testing.assert_allclose(out, oracle.attention(q, kk, v, mu, **kwargs), rtol=RTOL, atol=ATOL)
    assert np.all(out[np.broadcast_to(mask[:, None, :], out.shape[:3])] == 0)
    # padding does not change the unpadded tokens' result: padded rows are never seen
    q2, k2, v2 = (np.where(mask[:, None, :, None], 1e3, x) for x in (q, k, v))
    out2 = routing.attention(q2, None if shared else k2, v2, mu, **kwargs)
    np.testing.assert_allclose(out2, out, rtol=1e-13, atol=1e-15)


def test_cluster_chunks_give_the_same_answer(monkeypatch):
    module = importlib.import_module("refattn.routing.cluster_attention")
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, 1, 2, 12, 3, 2)
    qm = random_members(rng, 1, 2, 12, 5, 4)
    km = random_members(rng, 1, 2, 12, 5, 4)
    whole = routing.cluster_attention(q, k, v, qm, km, causal=True)
    grads = routing.cluster_attention_vjp(q, k, v, qm, km, np.ones_like(whole), causal=True)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 1)
    np.testing.assert_array_equal(routing.cluster_attention(q, k, v, qm, km, causal=True), whole)
    for a, b in zip(routing.cluster_attention_vjp(q, k, v, qm, km, np.ones_like(whole), causal=True), grads,
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    length=st.sampled_from([1, 2, 3, 5, 7, 11, 13]),
    dim=st.sampled_from([1, 2, 3, 5]),
    clusters=st.integers(1, 4),
    data=st.data(),
)
def test_property_attention_vs_oracle(config, length, dim, clusters, data):
    profile, causal, shared = config
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    window = data.draw(st.integers(1, length))
    q, k, v = qkv(rng, 1, 2, length, dim, 2)
    mu = rng.standard_normal((2, clusters, dim))
    mask = rng.random((1, length)) < 0.3 if data.draw(st.booleans()) else None
    kk = None if shared else k
    kwargs = dict(window=window, causal=causal, shared_qk=shared, profile=profile, key_padding_mask=mask)
    np.testing.assert_allclose(routing.attention(q, kk, v, mu, **kwargs), oracle.attention(q, kk, v, mu, **kwargs),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,block", [(1, 1), (1, 4), (7, 3), (12, 4), (13, 5), (6, 6), (5, 9), (10, 1)])
def test_local_attention_matches_the_dense_oracle(causal, length, block):
    rng = np.random.default_rng(length * 7 + block)
    q, k, v = qkv(rng, 2, 2, length, 3, 4)
    out = routing.local_attention(q, k, v, block, causal=causal)
    np.testing.assert_allclose(out, oracle.local_attention(q, k, v, block, causal=causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_with_padding(causal):
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, 3, 2, 11, 3, 2)
    mask = rng.random((3, 11)) < 0.4
    mask[1] = True
    mask[2, 3:9] = True  # a whole neighbourhood padded: some rows have no visible key
    out = routing.local_attention(q, k, v, 3, causal=causal, key_padding_mask=mask)
    np.testing.assert_allclose(out, oracle.local_attention(q, k, v, 3, causal=causal, key_padding_mask=mask),
                               rtol=RTOL, atol=ATOL)
    assert np.all(out[np.broadcast_to(mask[:, None, :], out.shape[:3])] == 0)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 17), block=st.integers(1, 8), dim=st.sampled_from([1, 2, 5]), causal=st.booleans(),
       seed=st.integers(0, 2**32 - 1), padded=st.booleans())
def test_property_local_attention_vs_oracle(length, block, dim, causal, seed, padded):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 1, 1, length, dim, 2)
    mask = rng.random((1, length)) < 0.3 if padded else None
    np.testing.assert_allclose(routing.local_attention(q, k, v, block, causal=causal, key_padding_mask=mask),
                               oracle.local_attention(q, k, v, block, causal=causal, key_padding_mask=mask),
                               rtol=RTOL, atol=ATOL)


def test_normalize_properties():
    rng = np.random.default_rng(9)
    x = 3.0 * rng.standard_normal((2, 2, 5, 7)) + 1.0
    y = routing.normalize(x)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), 1 / (1 + 1e-6 / x.var(axis=-1)), rtol=1e-12)
    np.testing.assert_allclose(y, oracle.normalize(x, "tacl"), rtol=1e-13, atol=1e-14)
    y = routing.normalize(x, profile="lucidrains")
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1, rtol=1e-14)
    np.testing.assert_allclose(y, oracle.normalize(x, "lucidrains"), rtol=1e-13)
    assert np.all(routing.normalize(np.zeros((1, 1, 2, 3)), profile="lucidrains") == 0)
    assert np.all(routing.normalize(np.ones((1, 1, 2, 1))) == 0)  # D = 1: LayerNorm gives 0


def test_lucidrains_self_logit_is_minus_5e4_exactly():
    # D = 1, shared QK: keys are sign(q). Token 0's logit on token 1 is q0 * sign(q1) = -50001,
    # its logit on itself is replaced by -5e4, so the weights are 1 : e^-1.
    q = np.array([[[[50001.0], [-1.0]]]])
    v = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    m = np.array([[[[0, 1]]]])
    o = routing.cluster_attention(q, None, v, m, m, shared_qk=True, profile="lucidrains")[0, 0, 0, 0]
    np.testing.assert_allclose(o, np.array([1.0, np.exp(-1.0)]) / (1.0 + np.exp(-1.0)), rtol=1e-12)
    np.testing.assert_allclose(oracle.routed_attention(q, None, v, m, m, shared_qk=True, profile="lucidrains")[0, 0, 0],
                               o / (1 + 1e-5), rtol=1e-12)


def test_float32_inputs_are_promoted_to_float64():
    rng = np.random.default_rng(10)
    q, k, v = (x.astype(np.float32) for x in qkv(rng, 1, 2, 9, 4, 3))
    mu = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out = routing.attention(q, k, v, mu, window=4)
    assert out.dtype == np.float64
    expected = routing.attention(*(x.astype(np.float64) for x in (q, k, v, mu)), window=4)
    np.testing.assert_array_equal(out, expected)
    assert q.dtype == np.float32  # inputs untouched
