"""Bad inputs to refattn.fsat raise the documented errors, naming the argument (one test per case)."""

import numpy as np
import pytest

from refattn import fsat

B, H, L, D = 2, 3, 5, 4


@pytest.fixture
def qkvw():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, B, H, L, D))
    return q, k, v, np.ones((H, D))


def test_rank_of_q(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^q: expected a 4-D array"):
        fsat.attention(q[0], k, v, w, 2)


def test_rank_of_cross_input():
    with pytest.raises(ValueError, match=r"^a: expected a 4-D array"):
        fsat.cross(np.zeros((L, D)), np.zeros((1, 1, L, D)))


def test_shape_of_k(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^k: expected shape \(B, H, L, D\)"):
        fsat.attention(q, k[:, :, :3], v, w, 2)


def test_head_dim_of_k(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^k: expected shape"):
        fsat.sparse_attention(q, k[..., :3], v, np.zeros((B, H, 1), dtype=np.int64))


def test_shape_of_v(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^v: expected shape \(B, H, L, Dv\)"):
        fsat.attention(q, k, v[:1], w, 2)


def test_shape_of_w(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^w: expected shape \(H, Dc\)"):
        fsat.attention(q, k, v, np.ones((H, D + 1)), 2)


def test_rank_of_w(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^w: expected a 2-D array"):
        fsat.estimate(np.zeros((B, H, 2 * L - 1, D)), np.ones(D))


def test_empty_axis(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^q: expected every axis"):
        fsat.attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], w, 2)


def test_dtype_integer(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"^v: expected a real floating-point array, got dtype int64"):
        fsat.attention(q, k, v.astype(np.int64), w, 2)


def test_dtype_complex(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"^q: expected a real floating-point array"):
        fsat.attention(q.astype(np.complex128), k, v, w, 2)


def test_nan(qkvw):
    q, k, v, w = qkvw
    k = k.copy()
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^k: expected finite values"):
        fsat.attention(q, k, v, w, 2)


def test_inf(qkvw):
    q, k, v, w = qkvw
    w = w.copy()
    w[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"^w: expected finite values"):
        fsat.attention(q, k, v, w, 2)


def test_plus_inf_score():
    s = np.zeros((1, 1, 3))
    s[0, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"^s: expected finite values or -inf"):
        fsat.select(s, 2)


def test_top_k_zero(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^top_k: expected an integer >= 1, got 0"):
        fsat.attention(q, k, v, w, 0)


def test_top_k_not_an_integer(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"^top_k: expected an integer, got float 2.0"):
        fsat.attention(q, k, v, w, 2.0)


def test_top_k_bool():
    with pytest.raises(TypeError, match=r"^top_k: expected an integer"):
        fsat.select(np.zeros((1, 1, 3)), True)


def test_even_offset_axis():
    with pytest.raises(ValueError, match=r"^s: expected 2L - 1 offsets"):
        fsat.select(np.zeros((1, 1, 4)), 2)


def test_mismatched_cross_inputs():
    with pytest.raises(ValueError, match=r"^b: expected shape \(B, H, L, Dc\)"):
        fsat.cross(np.zeros((1, 2, L, 3)), np.zeros((1, 2, L, 4)))


def test_mismatched_cross_q_length(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^cross_q: expected shape \(B, H, L, Dc\)"):
        fsat.attention(q, k, v, w, 2, cross_q=np.zeros((B, H, L + 1, D)), cross_k=np.zeros((B, H, L + 1, D)))


def test_mismatched_cross_k_features(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^cross_k: expected shape"):
        fsat.attention(q, k, v, w, 2, cross_q=np.zeros((B, H, L, 2)), cross_k=np.zeros((B, H, L, 3)))


def test_cross_q_without_cross_k(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^cross_k: cross_q and cross_k must be given together"):
        fsat.attention(q, k, v, w, 2, cross_q=q)


def test_cross_k_without_cross_q(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^cross_q: cross_q and cross_k must be given together"):
        fsat.attention_vjp(q, k, v, w, 2, np.zeros_like(v), cross_k=k)


def test_noise_shape(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^noise: expected shape \(B, H, 2L - 1\)"):
        fsat.attention(q, k, v, w, 2, noise=np.zeros((B, H, L)))


def test_noise_nan():
    noise = np.zeros((1, 1, 3))
    noise[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^noise: expected finite values"):
        fsat.select(np.zeros((1, 1, 3)), 2, noise=noise)


def test_mask_wrong_dtype(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"^key_padding_mask: expected a bool array"):
        fsat.attention(q, k, v, w, 2, key_padding_mask=np.zeros((B, L), dtype=np.int64))


def test_mask_wrong_shape(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^key_padding_mask: expected shape \(B, L\)"):
        fsat.attention(q, k, v, w, 2, key_padding_mask=np.zeros((B, L + 1), dtype=bool))


def test_pair_counts_mask_wrong_shape():
    with pytest.raises(ValueError, match=r"^key_padding_mask: expected shape \(B, L\)"):
        fsat.pair_counts(4, np.zeros(4, dtype=bool))


def test_pair_counts_length():
    with pytest.raises(ValueError, match=r"^length: expected an integer >= 1"):
        fsat.pair_counts(0)


def test_offsets_dtype(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"^offsets: expected an integer array"):
        fsat.sparse_attention(q, k, v, np.zeros((B, H, 2)))


def test_offsets_shape(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^offsets: expected shape \(B, H, K\)"):
        fsat.sparse_attention(q, k, v, np.zeros((1, H, 2), dtype=np.int64))


def test_offsets_out_of_range(qkvw):
    q, k, v, w = qkvw
    offsets = np.zeros((B, H, 2), dtype=np.int64)
    offsets[..., 1] = L
    with pytest.raises(ValueError, match=r"^offsets: expected offsets in \[-\(L-1\), L-1\]"):
        fsat.sparse_attention(q, k, v, offsets)


def test_offsets_repeated(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^offsets: expected distinct offsets"):
        fsat.sparse_attention(q, k, v, np.zeros((B, H, 2), dtype=np.int64))


def test_offsets_empty(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^offsets: expected at least one offset"):
        fsat.sparse_attention(q, k, v, np.zeros((B, H, 0), dtype=np.int64))


def test_bias_shape(qkvw):
    q, k, v, w = qkvw
    offsets = np.array([0, 1])[None, None].repeat(B, 0).repeat(H, 1)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(B, H, K\)"):
        fsat.sparse_attention(q, k, v, offsets, np.zeros((B, H, 3)))


def test_dout_shape(qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"^dout: expected shape \(B, H, L, Dv\)"):
        fsat.attention_vjp(q, k, v, w, 2, np.zeros((B, H, L, D + 1)))


def test_dlse_shape(qkvw):
    q, k, v, w = qkvw
    offsets = np.zeros((B, H, 1), dtype=np.int64)
    with pytest.raises(ValueError, match=r"^dlse: expected shape \(B, H, L\)"):
        fsat.sparse_attention_vjp(q, k, v, offsets, None, np.zeros_like(v), dlse=np.zeros((B, H, L + 1)))


def test_dc_shape():
    a = np.zeros((1, 1, L, 2))
    with pytest.raises(ValueError, match=r"^dc: expected shape \(B, H, 2L - 1, Dc\)"):
        fsat.cross_vjp(a, a, np.zeros((1, 1, L, 2)))


def test_ds_shape():
    with pytest.raises(ValueError, match=r"^ds: expected shape \(B, H, 2L - 1\)"):
        fsat.estimate_vjp(np.zeros((1, 1, 3, 2)), np.ones((1, 2)), np.zeros((1, 1, 5)))
