"""Bad inputs to refattn.routing raise the documented errors, naming the argument (one test per case)."""

import numpy as np
import pytest

from refattn import routing

B, H, L, D, C, W = 2, 3, 6, 4, 2, 3


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, B, H, L, D))
    mu = rng.standard_normal((H, C, D))
    members = np.tile(np.arange(W, dtype=np.int64), (B, H, C, 1))
    return q, k, v, mu, members


def test_rank_of_q(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^q: expected a 4-D array"):
        routing.attention(q[0], k, v, mu)


def test_shape_of_k(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^k: expected shape \(B, H, L, D\)"):
        routing.attention(q, k[:, :, :4], v, mu)


def test_head_dim_of_k(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^k: expected shape"):
        routing.attention(q, k[..., :3], v, mu)


def test_length_of_v(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^v: expected shape \(B, H, L, Dv\)"):
        routing.attention(q, k, v[:, :, :5], mu)


def test_empty_axis(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^q: expected every axis"):
        routing.attention(q[..., :0], k[..., :0], v, mu[..., :0])


def test_integer_dtype_of_q(data):
    q, k, v, mu, _ = data
    with pytest.raises(TypeError, match=r"^q: expected a real floating-point array"):
        routing.attention(q.astype(np.int64), k, v, mu)


def test_nan_in_q(data):
    q, k, v, mu, _ = data
    q[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^q: expected finite values"):
        routing.attention(q, k, v, mu)


def test_inf_in_v(data):
    q, k, v, mu, _ = data
    v[1, 2, 3, 0] = np.inf
    with pytest.raises(ValueError, match=r"^v: expected finite values"):
        routing.attention(q, k, v, mu)


def test_nan_in_centroids(data):
    q, k, v, mu, _ = data
    mu[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^centroids: expected finite values"):
        routing.attention(q, k, v, mu)


def test_centroids_heads_mismatch(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^centroids: expected shape \(H, C, D\)"):
        routing.attention(q, k, v, mu[:2])


def test_centroids_dim_mismatch(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^centroids: expected shape \(H, C, D\)"):
        routing.similarity(q, mu[..., :3])


def test_centroids_rank(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^centroids: expected a 3-D array"):
        routing.attention(q, k, v, mu[0])


def test_window_zero(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^window: expected an integer in \[1, 6\], got 0"):
        routing.attention(q, k, v, mu, window=0)


def test_window_above_length(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^window: expected an integer in \[1, 6\], got 7"):
        routing.attention(q, k, v, mu, window=7)


def test_window_not_an_integer(data):
    q, k, v, mu, _ = data
    with pytest.raises(TypeError, match=r"^window: expected an integer"):
        routing.attention(q, k, v, mu, window=2.0)


def test_route_window_above_length(data):
    with pytest.raises(ValueError, match=r"^window: expected an integer in \[1, 6\]"):
        routing.route(np.zeros((B, H, L, C)), L + 1)


def test_route_rank_of_similarities():
    with pytest.raises(ValueError, match=r"^similarities: expected a 4-D array"):
        routing.route(np.zeros((L, C)), 2)


def test_block_below_one(data):
    q, k, v, _, _ = data
    with pytest.raises(ValueError, match=r"^block: expected an integer >= 1, got 0"):
        routing.local_attention(q, k, v, 0)


def test_unknown_profile(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^profile: expected one of 'tacl', 'lucidrains', got 'google'"):
        routing.attention(q, k, v, mu, profile="google")


def test_unknown_profile_in_normalize(data):
    with pytest.raises(ValueError, match=r"^profile: expected one of"):
        routing.normalize(data[0], profile="l2")


def test_k_given_with_shared_qk(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^k: expected None with shared_qk=True"):
        routing.attention(q, k, v, mu, shared_qk=True)


def test_k_missing_without_shared_qk(data):
    q, _, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^k: expected a \(B, H, L, D\) array with shared_qk=False"):
        routing.attention(q, None, v, mu)


def test_lucidrains_causal_unshared(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^profile: 'lucidrains' does not support causal=True with shared_qk=False"
                                         r".*memory key/values"):
        routing.attention(q, k, v, mu, causal=True, profile="lucidrains")


def test_lucidrains_causal_unshared_in_cluster_attention(data):
    q, k, v, _, m = data
    with pytest.raises(ValueError, match=r"^profile: .*memory key/values"):
        routing.cluster_attention(q, k, v, m, m, causal=True, profile="lucidrains")


def test_members_out_of_range(data):
    q, k, v, _, m = data
    m = m.copy()
    m[0, 0, 0, 0] = L
    with pytest.raises(ValueError, match=r"^q_members: expected positions in \[0, L\)"):
        routing.cluster_attention(q, k, v, m, m.clip(max=L - 1))


def test_members_below_minus_one(data):
    q, k, v, _, m = data
    bad = m.copy()
    bad[1, 2, 1, 2] = -2
    with pytest.raises(ValueError, match=r"^k_members: expected positions in \[0, L\) = \[0, 6\) or -1"):
        routing.cluster_attention(q, k, v, m, bad)


def test_members_repeated(data):
    q, k, v, _, m = data
    bad = m.copy()
    bad[0, 0, 0] = [1, 1, 2]
    with pytest.raises(ValueError, match=r"^q_members: expected distinct positions"):
        routing.cluster_attention(q, k, v, bad, m)


def test_members_float_dtype(data):
    q, k, v, _, m = data
    with pytest.raises(TypeError, match=r"^q_members: expected an integer array"):
        routing.cluster_attention(q, k, v, m.astype(float), m)


def test_members_cluster_count_mismatch(data):
    q, k, v, _, m = data
    with pytest.raises(ValueError, match=r"^k_members: expected the same number of clusters"):
        routing.cluster_attention(q, k, v, m, m[:, :, :1])


def test_members_batch_mismatch(data):
    q, k, v, _, m = data
    with pytest.raises(ValueError, match=r"^q_members: expected shape \(B, H, C, W\)"):
        routing.cluster_attention(q, k, v, m[:1], m)


def test_combine_members_shape_mismatch(data):
    _, _, _, _, m = data
    with pytest.raises(ValueError, match=r"^q_members: expected shape \(B, H, C, W\) = \(2, 3, 2, 2\)"):
        routing.combine(np.zeros((B, H, C, 2, D)), m, L)


def test_combine_length_below_one(data):
    _, _, _, _, m = data
    with pytest.raises(ValueError, match=r"^length: expected an integer >= 1"):
        routing.combine(np.zeros((B, H, C, W, D)), m, 0)


def test_mask_dtype(data):
    q, k, v, mu, _ = data
    with pytest.raises(TypeError, match=r"^key_padding_mask: expected a bool array"):
        routing.attention(q, k, v, mu, key_padding_mask=np.zeros((B, L), dtype=np.int64))


def test_mask_shape(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^key_padding_mask: expected shape \(B, L\)"):
        routing.attention(q, k, v, mu, key_padding_mask=np.zeros((B, L + 1), dtype=bool))


def test_init_centroids_rng_type():
    with pytest.raises(TypeError, match=r"^rng: expected a numpy.random.Generator"):
        routing.init_centroids(1, 2, 3, rng=np.random.RandomState(0))


def test_init_centroids_zero_clusters():
    with pytest.raises(ValueError, match=r"^num_clusters: expected an integer >= 1"):
        routing.init_centroids(1, 0, 3, rng=np.random.default_rng(0))


def test_update_state_shape_mismatch(data):
    q, _, _, mu, _ = data
    state = routing.CentroidState(mu, np.zeros((H, C + 1)), mu)
    with pytest.raises(ValueError, match=r"^state.counts: expected shape \(H, C\)"):
        routing.update_centroids(state, q)


def test_update_q_hat_heads_mismatch(data):
    q, _, _, mu, _ = data
    state = routing.CentroidState(mu, np.zeros((H, C)), mu)
    with pytest.raises(ValueError, match=r"^q_hat: expected shape"):
        routing.update_centroids(state, q[:, :2])


def test_update_decay_out_of_range(data):
    q, _, _, mu, _ = data
    state = routing.CentroidState(mu, np.zeros((H, C)), mu)
    with pytest.raises(ValueError, match=r"^decay: expected a number in \[0, 1\]"):
        routing.update_centroids(state, q, decay=1.5)


def test_update_state_not_a_tuple(data):
    q, _, _, mu, _ = data
    with pytest.raises(TypeError, match=r"^state: expected a CentroidState"):
        routing.update_centroids(mu, q)


def test_commitment_beta_not_finite(data):
    q, _, _, mu, _ = data
    with pytest.raises(ValueError, match=r"^beta: expected a finite number"):
        routing.commitment_loss(q, mu, beta=np.nan)


def test_assign_centroids_mismatch(data):
    q, _, _, mu, _ = data
    with pytest.raises(ValueError, match=r"^centroids: expected shape"):
        routing.assign(q, mu[:, :, :2])


def test_normalize_vjp_cotangent_shape(data):
    q = data[0]
    with pytest.raises(ValueError, match=r"^dx_hat: expected shape"):
        routing.normalize_vjp(q, q[..., :2])


def test_similarity_vjp_cotangent_shape(data):
    q, _, _, mu, _ = data
    with pytest.raises(ValueError, match=r"^ds: expected shape \(B, H, L, C\)"):
        routing.similarity_vjp(q, mu, np.zeros((B, H, L, C + 1)))


def test_cluster_attention_vjp_cotangent_shape(data):
    q, k, v, _, m = data
    with pytest.raises(ValueError, match=r"^do: expected shape \(B, H, C, W, Dv\)"):
        routing.cluster_attention_vjp(q, k, v, m, m, np.zeros((B, H, C, W, D + 1)))


def test_attention_vjp_cotangent_shape(data):
    q, k, v, mu, _ = data
    with pytest.raises(ValueError, match=r"^dout: expected shape \(B, H, L, Dv\)"):
        routing.attention_vjp(q, k, v, mu, v[:, :, :3])


def test_local_attention_vjp_cotangent_shape(data):
    q, k, v, _, _ = data
    with pytest.raises(ValueError, match=r"^dout: expected shape \(B, H, L, Dv\)"):
        routing.local_attention_vjp(q, k, v, 2, v[..., :1])
