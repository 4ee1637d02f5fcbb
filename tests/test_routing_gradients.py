"""Every routing *_vjp against central finite differences (float64)."""

import numpy as np
import pytest

from refattn import routing
from refattn.conformance.gradcheck import numerical_vjp

EPS = 1e-5  # central differences: truncation ~ eps^2, rounding ~ 1e-16 / eps; both ~1e-10 here
RTOL, ATOL = 1e-8, 1e-9
CONFIGS = [
    ("tacl", False, False),
    ("tacl", False, True),
    ("tacl", True, False),
    ("tacl", True, True),
    ("lucidrains", False, False),
    ("lucidrains", False, True),
    ("lucidrains", True, True),
]


def assert_grads(actual, expected):
    assert len(actual) == len(expected)
    for index, (x, y) in enumerate(zip(actual, expected, strict=True)):
        assert x.shape == y.shape and x.dtype == np.float64, index
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=f"gradient {index}")


@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
def test_normalize_vjp(profile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 3, 5))
    dy = rng.standard_normal(x.shape)
    expected = numerical_vjp(lambda x: routing.normalize(x, profile=profile), [x], dy, EPS)
    assert_grads((routing.normalize_vjp(x, dy, profile=profile),), expected)


def test_normalize_vjp_lucidrains_at_the_clamp():
    x = np.zeros((1, 1, 1, 3))
    dy = np.array([[[[1.0, -2.0, 0.5]]]])
    np.testing.assert_allclose(routing.normalize_vjp(x, dy, profile="lucidrains"), dy / 1e-12)


def test_similarity_vjp():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5))
    mu = rng.standard_normal((3, 2, 5))
    ds = rng.standard_normal((2, 3, 4, 2))
    assert_grads(routing.similarity_vjp(x, mu, ds), numerical_vjp(routing.similarity, [x, mu], ds, EPS))


def members(rng, batch, heads, length, clusters, window):
    out = np.full((batch, heads, clusters, window), -1, dtype=np.int64)
    for b, h, c in np.ndindex(batch, heads, clusters):
        size = int(rng.integers(1, window + 1))
        out[b, h, c, :size] = np.sort(rng.choice(length, size=size, replace=False))
    return out


@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
def test_cluster_attention_vjp(profile, causal, shared):
    rng = np.random.default_rng(2)
    batch, heads, length, dim, dv = 1, 2, 7, 3, 2
    q, k = 1.5 * rng.standard_normal((2, batch, heads, length, dim))
    v = rng.standard_normal((batch, heads, length, dv))
    qm = members(rng, batch, heads, length, 3, 4)
    km = qm if shared else members(rng, batch, heads, length, 3, 4)
    do = rng.standard_normal(qm.shape + (dv,))
    do[qm < 0] = 0.0  # empty slots' outputs are constant 0
    kw = dict(causal=causal, shared_qk=shared, profile=profile)
    actual = routing.cluster_attention_vjp(q, None if shared else k, v, qm, km, do, **kw)
    if shared:
        assert actual[1] is None
        expected = numerical_vjp(lambda q, v: routing.cluster_attention(q, None, v, qm, km, **kw), [q, v], do, EPS)
        assert_grads((actual[0], actual[2]), expected)
    else:
        expected = numerical_vjp(lambda q, k, v: routing.cluster_attention(q, k, v, qm, km, **kw), [q, k, v], do, EPS)
        assert_grads(actual, expected)


@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
def test_combine_vjp(profile):
    rng = np.random.default_rng(3)
    qm = members(rng, 2, 1, 6, 3, 4)
    o = rng.standard_normal(qm.shape + (2,))
    dout = rng.standard_normal((2, 1, 6, 2))
    actual = routing.combine_vjp(qm, dout, profile=profile)
    expected = numerical_vjp(lambda o: routing.combine(o, qm, 6, profile=profile), [o], dout, EPS)
    assert_grads((actual,), expected)
    assert np.all(actual[qm < 0] == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,block,padded", [(1, 2, False), (7, 3, False), (8, 2, True), (5, 9, True)])
def test_local_attention_vjp(causal, length, block, padded):
    rng = np.random.default_rng(length + block)
    q, k = rng.standard_normal((2, 1, 2, length, 3))
    v = rng.standard_normal((1, 2, length, 2))
    mask = (rng.random((1, length)) < 0.3) if padded else None
    dout = rng.standard_normal(v.shape)
    kw = dict(causal=causal, key_padding_mask=mask)
    actual = routing.local_attention_vjp(q, k, v, block, dout, **kw)
    expected = numerical_vjp(lambda q, k, v: routing.local_attention(q, k, v, block, **kw), [q, k, v], dout, EPS)
    assert_grads(actual, expected)


def test_commitment_loss_vjp():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 4, 3))
    mu = rng.standard_normal((2, 3, 3))
    mask = np.array([[False, True, False, False], [False, False, False, True]])
    actual = routing.commitment_loss_vjp(x, mu, 2.5, beta=0.3, key_padding_mask=mask)
    expected = numerical_vjp(lambda x: np.array(routing.commitment_loss(x, mu, beta=0.3, key_padding_mask=mask)),
                             [x], np.array(2.5), EPS)
    assert_grads((actual,), expected)


@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_attention_vjp(profile, causal, shared, padded):
    rng = np.random.default_rng(5)
    batch, heads, length, dim, dv = 2, 1, 9, 3, 2
    # scale 3: LayerNorm's derivatives grow as 1/sigma^3, and a low-variance row makes the
    # finite-difference truncation error (not the analytic gradient) exceed the tolerance
    q, k = 3.0 * rng.standard_normal((2, batch, heads, length, dim))
    v = rng.standard_normal((batch, heads, length, dv))
    mu = rng.standard_normal((heads, 3, dim))
    mask = (rng.random((batch, length)) < 0.3) if padded else None
    dout = rng.standard_normal(v.shape)
    kw = dict(window=4, causal=causal, shared_qk=shared, profile=profile, key_padding_mask=mask)
    actual = routing.attention_vjp(q, None if shared else k, v, mu, dout, **kw)
    if shared:
        assert actual[1] is None
        expected = numerical_vjp(lambda q, v: routing.attention(q, None, v, mu, **kw), [q, v], dout, EPS)
        assert_grads((actual[0], actual[2]), expected)
    else:
        expected = numerical_vjp(lambda q, k, v: routing.attention(q, k, v, mu, **kw), [q, k, v], dout, EPS)
        assert_grads(actual, expected)
