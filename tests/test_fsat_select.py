"""FSAT selection: tie-breaking, causal candidates, K beyond the candidates, noise, n_tau = 0 offsets.

Scores are laid out over tau = -(L-1) .. L-1 (index t = tau + L - 1). Expected outputs are written
by hand from the rule of spec/interface.md.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import fsat
from refattn.conformance.oracles import fsat as oracle

NEG = -np.inf


def scores(*values):
    """One (batch, head) row of scores given for tau = -(L-1) .. L-1."""
    assert len(values) % 2 == 1
    return np.array(values, dtype=np.float64).reshape(1, 1, -1)


def offsets(s, k, **kw):
    result = fsat.select(s, k, **kw)
    assert result.dtype == np.int64
    return result[0, 0].tolist()


def test_top_scores_plus_zero_ascending():
    #            tau: -3   -2   -1   0    1    2    3
    s = scores(0.1, 5.0, 0.2, -9.0, 3.0, 0.3, 4.0)
    assert offsets(s, 1) == [0]
    assert offsets(s, 2) == [-2, 0]
    assert offsets(s, 3) == [-2, 0, 3]
    assert offsets(s, 4) == [-2, 0, 1, 3]


def test_zero_always_selected_and_never_twice():
    s = scores(1.0, 2.0, 100.0, 3.0, 0.5)  # tau = 0 has the best score
    assert offsets(s, 1) == [0]
    assert offsets(s, 2) == [0, 1]
    assert offsets(s, 3) == [-1, 0, 1]
    s = scores(1.0, 2.0, -1e300, 3.0, 0.5)  # ... or the worst
    assert offsets(s, 1) == [0]
    assert offsets(s, 2) == [0, 1]


def test_ties_prefer_smaller_magnitude_then_negative():
    s = scores(*([1.0] * 7))  # all equal: -1, 1, -2, 2, -3, 3
    assert offsets(s, 2) == [-1, 0]
    assert offsets(s, 3) == [-1, 0, 1]
    assert offsets(s, 4) == [-2, -1, 0, 1]
    assert offsets(s, 6) == [-3, -2, -1, 0, 1, 2]
    #            tau: -3   -2   -1   0    1    2    3
    s = scores(7.0, 2.0, 0.0, 0.0, 0.0, 2.0, 7.0)
    assert offsets(s, 2) == [-3, 0]  # -3 and 3 tie: the negative one
    assert offsets(s, 3) == [-3, 0, 3]
    assert offsets(s, 4) == [-3, -2, 0, 3]
    s = scores(7.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0)  # -3 and 1 tie: the smaller |tau|
    assert offsets(s, 2) == [0, 1]


def test_ties_negative_zero_equals_positive_zero():
    s = scores(0.0, -0.0, 0.0, 0.0, -0.0)  # L = 3: -2, -1, 0, 1, 2 all equal
    assert offsets(s, 3) == [-1, 0, 1]


def test_causal_candidates_are_negative_only():
    #            tau: -3   -2   -1   0    1     2     3
    s = scores(0.5, 0.1, 0.3, 0.0, 50.0, 60.0, 70.0)
    assert offsets(s, 3, causal=True) == [-3, -1, 0]
    assert offsets(s, 3) == [0, 2, 3]


@pytest.mark.parametrize("k", [5, 6, 8, 100])
def test_k_larger_than_candidates(k):
    s = scores(0.5, 0.1, 0.3, 0.0, 5.0)  # L = 3: four candidates, K_eff = 5
    assert offsets(s, k) == [-2, -1, 0, 1, 2]
    assert offsets(s, 4) == [-2, -1, 0, 2]
    assert offsets(s, k, causal=True) == [-2, -1, 0]  # two candidates, K_eff = 3


def test_length_one():
    assert offsets(scores(3.0), 1) == [0]
    assert offsets(scores(3.0), 9) == [0]
    assert offsets(scores(3.0), 9, causal=True) == [0]


def test_noise_is_added_for_selection_only():
    #        index/tau:  0/-2  1/-1  2/0   3/1   4/2
    s = scores(1.0, 2.0, 0.0, 0.5, 0.0)
    noise = np.array([5.0, 0.0, 0.0, 0.0, 0.5]).reshape(1, 1, 5)
    assert offsets(s, 2) == [-1, 0]
    assert offsets(s, 2, noise=noise) == [-2, 0]  # 1 + 5 > 2
    assert offsets(s, 3, noise=noise) == [-2, -1, 0]
    assert s[0, 0].tolist() == [1.0, 2.0, 0.0, 0.5, 0.0]  # not modified in place
    # Noise can create or break a tie.
    tie = np.array([1.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 5)  # -2 and -1 tie at 2: -1 wins
    assert offsets(s, 2, noise=tie) == [-1, 0]
    tie = np.array([0.0, 0.0, 0.0, 1.5, 0.0]).reshape(1, 1, 5)  # -1 and 1 tie at 2: -1 wins
    assert offsets(s, 2, noise=tie) == [-1, 0]
    tie = np.array([0.0, 0.0, 0.0, 2.0, 0.0]).reshape(1, 1, 5)  # 1 now ahead
    assert offsets(s, 2, noise=tie) == [0, 1]
    tie = np.array([0.0, 0.0, 0.0, 0.0, 2.0]).reshape(1, 1, 5)  # -1 and 2 tie at 2: -1 wins
    assert offsets(s, 2, noise=tie) == [-1, 0]


def test_offsets_without_pairs_are_last():
    # n_tau = 0 shows as s = -inf (positions 0 and 3 of L = 4 padded): such offsets lose to every
    # finite score, even with noise, and among themselves follow the tie order.
    #            tau: -3    -2    -1   0    1    2     3
    s = scores(NEG, NEG, 0.5, 1.0, -4.0, NEG, NEG)
    assert offsets(s, 3) == [-1, 0, 1]
    assert offsets(s, 4) == [-2, -1, 0, 1]
    assert offsets(s, 5) == [-2, -1, 0, 1, 2]
    assert offsets(s, 7) == [-3, -2, -1, 0, 1, 2, 3]
    noise = np.full((1, 1, 7), 1e300)
    assert offsets(s, 4, noise=noise) == [-2, -1, 0, 1]
    assert offsets(scores(NEG, NEG, NEG), 2) == [-1, 0]  # a fully padded row: tie order
    assert offsets(scores(NEG, NEG, NEG), 2, causal=True) == [-1, 0]


def test_offsets_without_pairs_from_estimate():
    mask = np.array([[True, False, False, True]])
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 4, 3))
    s = fsat.estimate(fsat.cross(q, k, key_padding_mask=mask), np.ones((1, 3)), key_padding_mask=mask)
    assert np.isneginf(s[0, 0, [0, 1, 5, 6]]).all() and np.isfinite(s[0, 0, [2, 3, 4]]).all()
    assert offsets(s, 3) == [-1, 0, 1]
    assert offsets(s, 4) == [-2, -1, 0, 1]


def test_batch_and_heads_are_independent():
    s = np.array(
        [
            [[0.0, 1.0, 0.0, 0.0, 2.0], [3.0, 1.0, 0.0, 0.0, 2.0]],
            [[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0, 0.0]],
        ]
    )
    result = fsat.select(s, 2)
    np.testing.assert_array_equal(result, [[[0, 2], [-2, 0]], [[-1, 0], [0, 1]]])


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 12),
    k=st.integers(1, 30),
    causal=st.booleans(),
    with_noise=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_select_matches_sorting_oracle_with_many_ties(length, k, causal, with_noise, seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(-2, 3, size=(2, 2, 2 * length - 1)).astype(np.float64)  # many ties
    s[rng.random(s.shape) < 0.2] = -np.inf
    noise = rng.integers(-1, 2, size=s.shape).astype(np.float64) if with_noise else None
    result = fsat.select(s, k, causal=causal, noise=noise)
    np.testing.assert_array_equal(result, oracle.select(s, k, causal, noise))
