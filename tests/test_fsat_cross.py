"""FSAT step 1 and 2a: pair_counts, cross and estimate against the naive O(L^2) oracles."""

import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import fsat
from refattn.conformance.oracles import fsat as oracle
from refattn.fsat.cross import next_fast_len

LENGTHS = [1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 31, 32, 61, 64, 97, 127, 128, 251, 256, 257]


def padding(kind: str, batch: int, length: int, rng: np.random.Generator):
    if kind == "none":
        return None
    mask = rng.random((batch, length)) < 0.3
    if kind == "full-row":
        mask[-1] = True  # one batch row entirely padding: n_tau = 0 everywhere, c = 0
    return mask


def assert_close_normwise(actual, expected, rtol=1e-12):
    """|actual - expected| <= rtol * max|expected| per (batch, head) slab (0 slabs must match exactly)."""
    assert actual.shape == expected.shape
    assert actual.dtype == np.float64
    scale = np.abs(expected).max(axis=(2, 3), keepdims=True)
    error = np.abs(actual - expected)
    relative = np.max(error / np.maximum(scale, 1e-300))
    assert np.all(error <= rtol * scale), f"max error {error.max()}, relative {relative}"


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", LENGTHS)
def test_cross_equals_naive_definition(length, kind):
    rng = np.random.default_rng(length)
    a = rng.standard_normal((2, 2, length, 3))
    b = rng.standard_normal((2, 2, length, 3))
    mask = padding(kind, 2, length, rng)
    c = fsat.cross(a, b, key_padding_mask=mask)
    assert c.shape == (2, 2, 2 * length - 1, 3)
    assert_close_normwise(c, oracle.cross(a, b, mask))
    if kind == "full-row":
        assert np.all(c[-1] == 0.0)


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 61, 128, 257])
def test_pair_counts_exact(length, kind):
    rng = np.random.default_rng(length + 1000)
    mask = padding(kind, 3, length, rng)
    counts = fsat.pair_counts(length, mask)
    assert counts.dtype == np.int64
    expected = oracle.pair_counts(length, mask, 1)
    np.testing.assert_array_equal(counts, expected)


def test_pair_counts_without_mask_is_length_minus_offset():
    np.testing.assert_array_equal(fsat.pair_counts(4), [[1, 2, 3, 4, 3, 2, 1]])


def test_cross_length_one_is_the_product():
    a = np.array([[[[1.5, -2.0]]]])
    b = np.array([[[[4.0, 0.25]]]])
    np.testing.assert_array_equal(fsat.cross(a, b), a * b)


def test_cross_hand_computed():
    # L = 3, Dc = 1: a = (1, 2, 3), b = (4, 5, 6); c_tau = mean of a_i b_{i+tau}.
    a = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    b = np.array([4.0, 5.0, 6.0]).reshape(1, 1, 3, 1)
    expected = [3 * 4, (2 * 4 + 3 * 5) / 2, (4 + 10 + 18) / 3, (1 * 5 + 2 * 6) / 2, 1 * 6]
    np.testing.assert_allclose(fsat.cross(a, b)[0, 0, :, 0], expected, rtol=1e-14)
    # Padding position 1: only pairs among positions {0, 2} count.
    mask = np.array([[False, True, False]])
    expected = [3 * 4, 0.0, (4 + 18) / 2, 0.0, 1 * 6]
    np.testing.assert_allclose(fsat.cross(a, b, key_padding_mask=mask)[0, 0, :, 0], expected, rtol=1e-14, atol=1e-15)


def test_cross_ignores_values_at_padding():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 1, 2, 9, 4))
    mask = np.zeros((1, 9), dtype=bool)
    mask[0, [2, 7]] = True
    a2, b2 = a.copy(), b.copy()
    a2[:, :, [2, 7]] = 1e6
    b2[:, :, [2, 7]] = -1e6
    np.testing.assert_array_equal(fsat.cross(a, b, key_padding_mask=mask), fsat.cross(a2, b2, key_padding_mask=mask))


@pytest.mark.parametrize("length", [1, 2, 5, 13, 32])
def test_estimate_with_unit_weights_is_mean_logit_per_diagonal(length):
    """The Toeplitz reading: with w = 1, s_tau is the mean of diagonal tau of q k^T / sqrt(D)."""
    rng = np.random.default_rng(length)
    q, k = rng.standard_normal((2, 1, 2, length, 6))
    s = fsat.estimate(fsat.cross(q, k), np.ones((2, 6)))
    for h in range(2):
        logits = q[0, h] @ k[0, h].T / np.sqrt(6)
        means = [np.diagonal(logits, offset=tau).mean() for tau in range(-(length - 1), length)]
        np.testing.assert_allclose(s[0, h], means, rtol=1e-12, atol=1e-12 * np.abs(logits).max())


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", [1, 2, 6, 11, 40])
def test_estimate_equals_naive(length, kind):
    rng = np.random.default_rng(length + 7)
    c = rng.standard_normal((2, 3, 2 * length - 1, 5))
    w = rng.standard_normal((3, 5))
    mask = padding(kind, 2, length, rng)
    s = fsat.estimate(c, w, key_padding_mask=mask)
    expected = oracle.estimate(c, w, mask)
    assert s.dtype == np.float64
    np.testing.assert_array_equal(np.isneginf(s), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(s[finite], expected[finite], rtol=1e-13, atol=1e-14)
    if kind == "full-row":
        assert np.all(np.isneginf(s[-1]))


def test_estimate_minus_inf_exactly_where_no_pair():
    # L = 4, positions 0 and 3 padded: only offsets -1, 0, 1 have a pair (positions 1 and 2).
    mask = np.array([[True, False, False, True]])
    c = np.ones((1, 1, 7, 2))
    s = fsat.estimate(c, np.ones((1, 2)), key_padding_mask=mask)
    root2 = np.sqrt(2.0)
    np.testing.assert_array_equal(s[0, 0], [-np.inf, -np.inf, 2 / root2, 2 / root2, 2 / root2, -np.inf, -np.inf])


@settings(max_examples=40, deadline=None)
@given(
    length=st.sampled_from([1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]),
    features=st.integers(1, 5),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    padded=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_cross_property_matches_oracle(length, features, batch, heads, padded, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, heads, length, features))
    b = rng.standard_normal((batch, heads, length, features))
    mask = rng.random((batch, length)) < 0.4 if padded else None
    assert_close_normwise(fsat.cross(a, b, key_padding_mask=mask), oracle.cross(a, b, mask))
    np.testing.assert_array_equal(fsat.pair_counts(length, mask), oracle.pair_counts(length, mask, 1))


def test_next_fast_len_matches_scipy():
    """The pure-Python FFT length (shared with the torch and CuPy backends) is SciPy's, real=True."""
    for n in list(range(1, 3000)) + [2**20 + 1, 3**9 + 7, 5**8 + 1, 32767, 2**31 - 1]:
        assert next_fast_len(n) == scipy.fft.next_fast_len(n, real=True), n
