"""FSAT sparse attention and the whole pipeline against the dense masked L x L oracle."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import fsat
from refattn.conformance.oracles import fsat as oracle

RTOL, ATOL = 1e-12, 1e-13


def inputs(seed, batch=2, heads=2, length=9, dim=4, dim_v=None, *, scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, length, dim)) * scale
    k = rng.standard_normal((batch, heads, length, dim)) * scale
    v = rng.standard_normal((batch, heads, length, dim_v or dim))
    return rng, q, k, v


def random_offsets(rng, batch, heads, length, count):
    """Distinct offsets per (batch, head), in random order."""
    pool = np.arange(-(length - 1), length)
    return np.stack(
        [np.stack([rng.choice(pool, size=count, replace=False) for _ in range(heads)]) for _ in range(batch)]
    )


def check_sparse(q, k, v, offsets, bias, causal, mask):
    out, lse = fsat.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    ref_out, ref_lse = oracle.sparse_attention(q, k, v, offsets, bias, causal, mask)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == q.shape[:3] + (v.shape[3],) and lse.shape == q.shape[:3]
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], ref_lse[np.isfinite(ref_lse)], rtol=RTOL, atol=ATOL)
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("length,dim,dim_v,count",
                         [(1, 3, 3, 1), (2, 1, 2, 2), (9, 4, 4, 4), (13, 5, 2, 6), (16, 3, 7, 31)])
def test_sparse_attention_equals_dense_oracle(length, dim, dim_v, count, with_bias, padded, causal):
    rng, q, k, v = inputs(length * 100 + count, length=length, dim=dim, dim_v=dim_v)
    count = min(count, 2 * length - 1)
    offsets = random_offsets(rng, 2, 2, length, count)
    bias = rng.standard_normal((2, 2, count)) * 2 if with_bias else None
    mask = None
    if padded:
        mask = rng.random((2, length)) < 0.3
        mask[1] = True  # a fully padded batch row
    out, lse = check_sparse(q, k, v, offsets, bias, causal, mask)
    if padded:
        assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))
        assert np.all(out[0][:, mask[0]] == 0)


def test_sparse_attention_rows_without_keys_are_zero():
    rng, q, k, v = inputs(3, batch=1, heads=1, length=6)
    offsets = np.array([[[2, 4]]])  # causal: no key j <= i on these diagonals
    out, lse = check_sparse(q, k, v, offsets, None, True, None)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    out, lse = check_sparse(q, k, v, offsets, None, False, None)  # rows i >= 4 have no key
    assert np.all(out[0, 0, 4:] == 0) and np.all(np.isneginf(lse[0, 0, 4:]))
    assert np.all(np.isfinite(lse[0, 0, :4]))


def test_sparse_attention_minus_inf_bias_removes_offset():
    rng, q, k, v = inputs(4, batch=1, heads=1, length=7)
    offsets = np.array([[[0, -1, 2]]])
    bias = np.array([[[0.5, -np.inf, 1.0]]])
    out, _ = check_sparse(q, k, v, offsets, bias, False, None)
    without, _ = fsat.sparse_attention(q, k, v, offsets[:, :, [0, 2]], bias[:, :, [0, 2]])
    np.testing.assert_allclose(out, without, rtol=1e-15, atol=0)
    out, lse = check_sparse(q, k, v, offsets, np.full((1, 1, 3), -np.inf), False, None)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_sparse_attention_single_offset_is_copy():
    rng, q, k, v = inputs(5, length=5)
    offsets = np.zeros((2, 2, 1), dtype=np.int64)
    out, lse = fsat.sparse_attention(q, k, v, offsets)
    np.testing.assert_array_equal(out, v)
    np.testing.assert_allclose(lse, np.einsum("bhld,bhld->bhl", q, k) / 2.0, rtol=1e-15)


def test_sparse_attention_offset_order_does_not_matter():
    rng, q, k, v = inputs(6, length=8)
    offsets = random_offsets(rng, 2, 2, 8, 5)
    bias = rng.standard_normal((2, 2, 5))
    order = np.argsort(offsets, axis=-1)
    a = fsat.sparse_attention(q, k, v, offsets, bias)
    b = fsat.sparse_attention(q, k, v, np.take_along_axis(offsets, order, -1), np.take_along_axis(bias, order, -1))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14, atol=1e-15)


def test_sparse_attention_large_logits_are_stable():
    rng, q, k, v = inputs(7, length=10, scale=40.0)  # logits in the thousands
    offsets = random_offsets(rng, 2, 2, 10, 5)
    out, lse = fsat.sparse_attention(q, k, v, offsets, rng.standard_normal((2, 2, 5)) * 500)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    check_sparse(q, k, v, offsets, None, False, None)


def check_attention(q, k, v, w, top_k, **kw):
    out = fsat.attention(q, k, v, w, top_k, **kw)
    ref = oracle.attention(
        q, k, v, w, top_k, kw.get("causal", False), kw.get("key_padding_mask"), kw.get("noise"),
        kw.get("cross_q"), kw.get("cross_k"),
    )
    assert out.dtype == np.float64 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("separate_cross", [False, True])
@pytest.mark.parametrize("length,dim,dim_v,top_k",
                         [(1, 2, 3, 4), (2, 3, 3, 2), (7, 5, 2, 3), (11, 4, 4, 30), (17, 3, 6, 5)])
def test_attention_equals_dense_oracle(length, dim, dim_v, top_k, separate_cross, noisy, padded, causal):
    rng, q, k, v = inputs(length * 7 + top_k, length=length, dim=dim, dim_v=dim_v)
    dim_c = 3 if separate_cross else dim
    w = rng.standard_normal((2, dim_c)) * 2
    kw = {"causal": causal}
    if separate_cross:
        kw["cross_q"] = rng.standard_normal((2, 2, length, dim_c))
        kw["cross_k"] = rng.standard_normal((2, 2, length, dim_c))
    if noisy:
        kw["noise"] = rng.gumbel(size=(2, 2, 2 * length - 1))
    if padded:
        mask = rng.random((2, length)) < 0.3
        mask[1] = True
        kw["key_padding_mask"] = mask
    out = check_attention(q, k, v, w, top_k, **kw)
    if padded:
        assert np.all(out[1] == 0) and np.all(out[0][:, mask[0]] == 0)


def test_attention_every_unpadded_row_attends_to_itself():
    rng, q, k, v = inputs(8, length=12)
    w = np.ones((2, 4))
    out = fsat.attention(q, k, v, w, 1)  # K = 1: only tau = 0, the output is v itself
    np.testing.assert_array_equal(out, v)
    mask = np.zeros((2, 12), dtype=bool)
    mask[:, ::3] = True
    out = fsat.attention(q, k, v, w, 1, causal=True, key_padding_mask=mask)
    np.testing.assert_array_equal(out, np.where(mask[:, None, :, None], 0.0, v))


def test_attention_promotes_to_float64_and_leaves_inputs_alone():
    rng, q, k, v = inputs(9, length=6)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    copies = [x.copy() for x in (q32, k32, v32)]
    w = np.ones((2, 4), dtype=np.float32)
    out = fsat.attention(q32, k32, v32, w, 3)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, oracle.attention(q32, k32, v32, w, 3), rtol=RTOL, atol=ATOL)
    for x, y in zip((q32, k32, v32), copies, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("causal,planted", [(False, 5), (False, -7), (True, -3), (False, 40)])
@pytest.mark.parametrize("length", [64, 1031])
def test_planted_dominant_diagonal_is_selected(length, causal, planted):
    rng, q, k, v = inputs(length + planted, length=length, dim=16)
    # k_{i + tau*} strongly aligned with q_i for every i with i + tau* in range.
    lo, hi = max(0, -planted), min(length, length - planted)
    k[:, :, lo + planted : hi + planted] = 3.0 * q[:, :, lo:hi] + 0.1 * k[:, :, lo + planted : hi + planted]
    s = fsat.estimate(fsat.cross(q, k), np.ones((2, 16)))
    offsets = fsat.select(s, 2, causal=causal)
    np.testing.assert_array_equal(offsets, np.broadcast_to(sorted([0, planted]), (2, 2, 2)))
    # ... and through the whole pipeline the planted key takes almost all the weight of its row
    # (a dominance check, not an oracle comparison: the weight is 1 - O(exp(-logit gap)), gap ~ 12).
    out = fsat.attention(q, k, v, np.ones((2, 16)), 2, causal=causal)
    np.testing.assert_allclose(out[:, :, lo:hi], v[:, :, lo + planted : hi + planted], rtol=0, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(
    length=st.sampled_from([1, 2, 3, 5, 7, 11, 13]),
    dim=st.sampled_from([1, 2, 3, 5]),
    dim_v=st.sampled_from([1, 3, 4]),
    top_k=st.integers(1, 8),
    causal=st.booleans(),
    padded=st.booleans(),
    noisy=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_property_matches_oracle(length, dim, dim_v, top_k, causal, padded, noisy, seed):
    rng, q, k, v = inputs(seed, length=length, dim=dim, dim_v=dim_v)
    w = rng.standard_normal((2, dim))
    mask = rng.random((2, length)) < 0.3 if padded else None
    noise = rng.gumbel(size=(2, 2, 2 * length - 1)) if noisy else None
    check_attention(q, k, v, w, top_k, causal=causal, key_padding_mask=mask, noise=noise)
