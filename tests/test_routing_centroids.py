"""routing.update_centroids, init_centroids and commitment_loss against hand computations."""

import numpy as np
import pytest

from refattn import routing
from refattn.conformance.oracles import routing as oracle

EPS = 1e-5  # the tacl Laplace smoothing


def state(means, counts, sums):
    return routing.CentroidState(np.array(means, float), np.array(counts, float), np.array(sums, float))


MU = [[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]  # H = 1, C = 3, D = 2
# x0 -> c0, x1 -> c1, x2 = (1, 1) ties c0/c1 -> c0; c2 is never chosen
X = np.array([[[[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]]])


def smoothed(counts):
    counts = np.asarray(counts, float)
    n = counts.sum()
    return (counts + EPS) / (n + len(counts) * EPS) * n


def test_tacl_update_by_hand():
    s0 = state(MU, [[2.0, 1.0, 0.5]], [[[2.0, 0.0], [0.0, 1.0], [-0.5, 0.0]]])
    new = routing.update_centroids(s0, X, decay=0.5)
    # N = (2, 1, 0); S = ((3, 2), (0, 3), (0, 0))
    counts = [0.5 * 2 + 0.5 * 2, 0.5 * 1 + 0.5 * 1, 0.5 * 0.5 + 0]
    sums = [[0.5 * 2 + 0.5 * 3, 0.5 * 0 + 0.5 * 2], [0.0, 0.5 * 1 + 0.5 * 3], [-0.25, 0.0]]
    np.testing.assert_allclose(new.counts, [counts], rtol=1e-15)
    np.testing.assert_allclose(new.sums, [sums], rtol=1e-15)
    np.testing.assert_allclose(new.means, [np.array(sums) / smoothed(counts)[:, None]], rtol=1e-14)
    np.testing.assert_array_equal(s0.means, MU)  # functional: the input state is untouched


def test_tacl_update_unshared_applies_q_then_k_statistics():
    s0 = state(MU, [[1.0, 1.0, 1.0]], [[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    k = np.array([[[[-3.0, 0.0], [0.5, 0.2], [0.0, 2.0]]]])  # -> c2, c0, c1 under the incoming means
    new = routing.update_centroids(s0, X, k, decay=0.9)
    nq, sq = np.array([2.0, 1.0, 0.0]), np.array([[3.0, 2.0], [0.0, 3.0], [0.0, 0.0]])
    nk, sk = np.array([1.0, 1.0, 1.0]), np.array([[0.5, 0.2], [0.0, 2.0], [-3.0, 0.0]])
    counts = 0.9 * (0.9 * np.ones(3) + 0.1 * nq) + 0.1 * nk
    sums = 0.9 * (0.9 * np.array(s0.sums[0]) + 0.1 * sq) + 0.1 * sk
    np.testing.assert_allclose(new.counts[0], counts, rtol=1e-15)
    np.testing.assert_allclose(new.sums[0], sums, rtol=1e-15)
    np.testing.assert_allclose(new.means[0], sums / smoothed(counts)[:, None], rtol=1e-14)


def test_tacl_update_excludes_padding_and_keeps_means_when_nothing_was_ever_counted():
    s0 = state(MU, [[0.0, 0.0, 0.0]], MU)
    mask = np.array([[False, False, True]])
    new = routing.update_centroids(s0, X, key_padding_mask=mask, decay=0.5)
    counts = np.array([0.5, 0.5, 0.0])  # x2 padded: N = (1, 1, 0)
    sums = 0.5 * np.array(MU[0]) + 0.5 * np.array([[2.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(new.counts[0], counts, rtol=1e-15)
    np.testing.assert_allclose(new.means[0], sums / smoothed(counts)[:, None], rtol=1e-14)
    # the never-chosen cluster's mean is divided by a smoothed count of about eps: it grows (as in TF)
    assert np.linalg.norm(new.means[0, 2]) > 1e4
    everything = routing.update_centroids(s0, X, key_padding_mask=np.ones((1, 3), bool), decay=0.5)
    np.testing.assert_array_equal(everything.means, s0.means)
    np.testing.assert_array_equal(everything.counts, 0)


def test_tacl_update_is_per_head_and_sums_over_the_batch():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((2, 3, 4))
    s0 = state(mu, np.ones((2, 3)), mu)
    x = rng.standard_normal((3, 2, 5, 4))
    new = routing.update_centroids(s0, x, decay=0.99)
    labels = oracle.assign(x, mu)
    for h in range(2):
        n = np.array([(labels[:, h] == c).sum() for c in range(3)], float)
        s = np.array([x[:, h][labels[:, h] == c].sum(axis=0) for c in range(3)])
        counts = 0.99 + 0.01 * n
        sums = 0.99 * mu[h] + 0.01 * s
        np.testing.assert_allclose(new.means[h], sums / smoothed(counts)[:, None], rtol=1e-13)


def test_lucidrains_update_by_hand():
    x = np.array([[[[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]]]])  # -> c1, c0, c0; c2 empty
    s0 = state(MU, [[7.0, 7.0, 7.0]], np.zeros((1, 3, 2)))
    new = routing.update_centroids(s0, x, profile="lucidrains", decay=0.9)
    m0 = np.array([1.8, 0.6]) / np.sqrt(3.6)
    m1 = np.array([0.6, 0.8])
    m2 = np.array(MU[0][2])  # empty cluster keeps its centroid
    expected = 0.9 * np.array(MU[0]) + 0.1 * np.array([m0, m1, m2])
    np.testing.assert_allclose(new.means[0], expected, rtol=1e-15)
    np.testing.assert_array_equal(new.counts, s0.counts)  # unused by this profile
    np.testing.assert_array_equal(new.sums, s0.sums)


def test_lucidrains_update_unshared_pools_q_and_k_and_excludes_padding():
    q = np.array([[[[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]]]])
    # -> c1, c2, and c0 ((0, -1) scores 0, -1, 0: a tie, the lower index)
    k = np.array([[[[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]]])
    s0 = state(MU, np.zeros((1, 3)), np.zeros((1, 3, 2)))
    new = routing.update_centroids(s0, q, k, profile="lucidrains", decay=0.5)
    sums = np.array([[1.8, 0.6 - 1.0], [0.6, 1.8], [-1.0, 0.0]])
    m = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    np.testing.assert_allclose(new.means[0], 0.5 * np.array(MU[0]) + 0.5 * m, rtol=1e-15)
    mask = np.array([[False, True, True]])  # only q0 -> c1 and k0 -> c1 remain
    new = routing.update_centroids(s0, q, k, profile="lucidrains", key_padding_mask=mask, decay=0.5)
    m1 = np.array([0.6, 1.8]) / np.linalg.norm([0.6, 1.8])
    np.testing.assert_allclose(new.means[0], 0.5 * np.array(MU[0]) + 0.5 * np.array([MU[0][0], m1, MU[0][2]]),
                               rtol=1e-15)


@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
def test_init_centroids_is_a_function_of_the_generator(profile):
    a = routing.init_centroids(3, 5, 8, rng=np.random.default_rng(42), profile=profile)
    b = routing.init_centroids(3, 5, 8, rng=np.random.default_rng(42), profile=profile)
    c = routing.init_centroids(3, 5, 8, rng=np.random.default_rng(43), profile=profile)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.means, c.means)
    assert a.means.shape == (3, 5, 8) and a.counts.shape == (3, 5) and a.sums.shape == (3, 5, 8)
    assert np.all(a.counts == 0)
    np.testing.assert_array_equal(a.sums, a.means)
    g = np.random.default_rng(42).standard_normal((3, 5, 8))
    if profile == "tacl":
        expected = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(a.means.mean(-1), 0, atol=1e-14)
    else:
        expected = g / np.linalg.norm(g, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(a.means, axis=-1), 1, rtol=1e-14)
    np.testing.assert_allclose(a.means, expected, rtol=1e-13)


def test_commitment_loss_by_hand():
    mu = np.array(MU)
    # residuals: x0 - c0 = (1, 1); x1 - c1 = (0, 2); x2 - c0 = (0, 1)
    loss = routing.commitment_loss(X, mu)
    assert loss == pytest.approx(1e-4 * (1 + 1 + 0 + 4 + 0 + 1) / 6, rel=1e-15)
    assert routing.commitment_loss(X, mu, beta=2.0) == pytest.approx(2.0 * 7 / 6, rel=1e-15)
    mask = np.array([[False, True, False]])
    assert routing.commitment_loss(X, mu, key_padding_mask=mask) == pytest.approx(1e-4 * 3 / 4, rel=1e-15)
    assert routing.commitment_loss(X, mu, key_padding_mask=np.ones((1, 3), bool)) == 0.0
    grad = routing.commitment_loss_vjp(X, mu, 3.0, key_padding_mask=mask)
    np.testing.assert_allclose(grad[0, 0], 3.0 * 2e-4 / 4 * np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]), rtol=1e-15)


def test_commitment_loss_matches_the_oracle():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 4))
    mu = rng.standard_normal((3, 5, 4))
    mask = rng.random((2, 7)) < 0.3
    for m in (None, mask):
        assert routing.commitment_loss(x, mu, key_padding_mask=m) == pytest.approx(
            oracle.commitment_loss(x, mu, key_padding_mask=m), rel=1e-13)
