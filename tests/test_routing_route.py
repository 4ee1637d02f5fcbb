"""routing.route (balanced top-W membership), routing.assign and the defaults, against hand
computations and the naive oracle (a full sort with the tie rule as a Python key)."""

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import routing
from refattn.conformance.oracles import routing as oracle


def test_each_centroid_takes_exactly_w_members_in_position_order():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 17, 5))
    members = routing.route(s, 4)
    assert members.shape == (2, 3, 5, 4) and members.dtype == np.int64
    assert np.all(np.diff(members, axis=-1) > 0)  # strictly increasing positions, no -1
    for b, h, c in np.ndindex(2, 3, 5):
        top = set(np.argsort(-s[b, h, :, c])[:4])
        assert set(members[b, h, c]) == top
    np.testing.assert_array_equal(members, oracle.route(s, 4))


def test_hand_example():
    # one (b, h), L = 6, two centroids
    s = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.8], [0.7, -1.0], [0.2, 0.0], [0.6, 0.85]])
    members = routing.route(s[None, None], 3)[0, 0]
    np.testing.assert_array_equal(members, [[1, 3, 5], [0, 2, 5]])


def test_ties_take_the_lower_position_first():
    s = np.zeros((1, 1, 6, 1))
    np.testing.assert_array_equal(routing.route(s, 3)[0, 0, 0], [0, 1, 2])
    s = np.array([2.0, 1.0, 1.0, 3.0, 1.0, 1.0]).reshape(1, 1, 6, 1)  # two above, four tied at 1.0
    np.testing.assert_array_equal(routing.route(s, 4)[0, 0, 0], [0, 1, 2, 3])
    s = np.array([1.0, 1.0, 5.0, 1.0, 5.0, 0.0]).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(routing.route(s, 3)[0, 0, 0], [0, 2, 4])


def test_padding_is_never_routed_and_leftover_slots_hold_minus_one_at_the_end():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((2, 1, 6, 3))
    s[0, 0, 1] = 100.0  # the best token of every centroid, but padded
    mask = np.array([[False, True, False, True, True, False], [True, True, True, True, False, True]])
    members = routing.route(s, 4, key_padding_mask=mask)
    for c in range(3):
        np.testing.assert_array_equal(members[0, 0, c, :3], [0, 2, 5])  # the only unpadded tokens
        assert members[0, 0, c, 3] == -1
        np.testing.assert_array_equal(members[1, 0, c], [4, -1, -1, -1])
    np.testing.assert_array_equal(members, oracle.route(s, 4, mask))


def test_all_padded_batch_element_has_only_empty_slots():
    s = np.ones((1, 2, 4, 2))
    members = routing.route(s, 2, key_padding_mask=np.ones((1, 4), dtype=bool))
    assert np.all(members == -1)


def test_length_one():
    np.testing.assert_array_equal(routing.route(np.zeros((1, 1, 1, 3)), 1), np.zeros((1, 1, 3, 1)))


def test_tokens_in_several_clusters_or_in_none():
    s = np.array([[5.0, 5.0], [4.0, 4.0], [0.0, 0.0], [-1.0, -1.0]])[None, None]
    members = routing.route(s, 2)[0, 0]
    np.testing.assert_array_equal(members, [[0, 1], [0, 1]])  # tokens 2 and 3 in none, 0 and 1 in both


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    length=st.sampled_from([1, 2, 3, 5, 7, 11, 13, 16]),
    clusters=st.integers(1, 4),
    data=st.data(),
)
def test_route_matches_the_oracle_with_many_ties(batch, heads, length, clusters, data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    window = data.draw(st.integers(1, length))
    s = rng.integers(-2, 3, size=(batch, heads, length, clusters)).astype(np.float64)  # ties everywhere
    mask = rng.random((batch, length)) < 0.3 if data.draw(st.booleans()) else None
    np.testing.assert_array_equal(routing.route(s, window, key_padding_mask=mask), oracle.route(s, window, mask))


def test_route_chunks_give_the_same_answer(monkeypatch):
    route_module = importlib.import_module("refattn.routing.route")  # the attribute is the function

    rng = np.random.default_rng(2)
    s = rng.integers(0, 4, size=(1, 2, 50, 7)).astype(np.float64)
    expected = oracle.route(s, 9)
    monkeypatch.setattr(route_module, "_CHUNK_ELEMENTS", 60)  # one centroid per chunk
    np.testing.assert_array_equal(routing.route(s, 9), expected)


def test_assign_by_hand_with_ties_and_padding():
    mu = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    x = np.array([[[[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [-5.0, 0.1], [0.0, 0.0]]]])
    np.testing.assert_array_equal(routing.assign(x, mu)[0, 0], [0, 1, 0, 2, 0])  # (1,1) and 0 tie -> lower index
    mask = np.array([[False, True, False, False, True]])
    labels = routing.assign(x, mu, key_padding_mask=mask)
    np.testing.assert_array_equal(labels[0, 0], [0, -1, 0, 2, -1])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, oracle.assign(x, mu, mask))


def test_defaults():
    assert [routing.default_num_clusters(n) for n in (1, 2, 3, 4, 6, 7, 100, 65_536)] == [1, 1, 2, 2, 2, 3, 10, 256]
    assert routing.default_window(65_536, 256) == 256
    assert routing.default_window(10, 3) == 4
    assert routing.default_window(1, 1) == 1
    assert routing.default_window(5, 9) == 1
    for n in range(1, 300):
        c = routing.default_num_clusters(n)
        w = routing.default_window(n, c)
        assert 1 <= w <= n and c * w >= n


@pytest.mark.parametrize("length", [1, 7, 64])
def test_similarity_is_the_dot_product(length):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((2, 3, length, 5))
    mu = rng.standard_normal((3, 4, 5))
    s = routing.similarity(x, mu)
    for b, h, t, c in [(0, 0, 0, 0), (1, 2, length - 1, 3), (1, 1, length // 2, 2)]:
        assert s[b, h, t, c] == pytest.approx(float(sum(x[b, h, t, d] * mu[h, c, d] for d in range(5))), rel=1e-13)
