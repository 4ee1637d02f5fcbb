"""Every FSAT *_vjp against central finite differences (float64), and the truncation of step 4."""

import numpy as np
import pytest

from refattn import fsat
from refattn.conformance.gradcheck import numerical_vjp

EPS = 1e-5  # central differences: truncation ~ eps^2, rounding ~ 1e-16 / eps; both ~1e-10 here
RTOL, ATOL = 1e-8, 1e-9


def assert_grads(actual, expected):
    assert len(actual) == len(expected)
    for index, (x, y) in enumerate(zip(actual, expected, strict=True)):
        assert x.shape == y.shape and x.dtype == np.float64, index
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=f"gradient {index}")


def make_mask(rng, batch, length, kind):
    if kind == "none":
        return None
    mask = rng.random((batch, length)) < 0.35
    mask[0, 0] = True
    if kind == "full-row":
        mask[-1] = True
    return mask


def test_numerical_vjp_on_a_known_function():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 2))
    gx, gy = rng.standard_normal((2, 3, 2))

    def f(x, y):
        return x * y, np.sin(x).sum(axis=1)

    cot = (gx, gy[:, 0])
    dx, dy = numerical_vjp(f, [x, y], cot, EPS)
    np.testing.assert_allclose(dx, gx * y + np.cos(x) * gy[:, :1], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dy, gx * x, rtol=1e-9, atol=1e-10)
    assert x.shape == (3, 2)  # inputs untouched
    with pytest.raises(ValueError, match="cotangent"):
        numerical_vjp(f, [x, y], gx, EPS)


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", [1, 2, 5, 8])
def test_cross_vjp(length, kind):
    rng = np.random.default_rng(length)
    a, b = rng.standard_normal((2, 2, 2, length, 3))
    mask = make_mask(rng, 2, length, kind)
    dc = rng.standard_normal((2, 2, 2 * length - 1, 3))
    actual = fsat.cross_vjp(a, b, dc, key_padding_mask=mask)
    expected = numerical_vjp(lambda a, b: fsat.cross(a, b, key_padding_mask=mask), [a, b], dc, EPS)
    assert_grads(actual, expected)
    if mask is not None:  # padded rows are zero in the forward: no gradient reaches them
        padded = np.broadcast_to(mask[:, None, :, None], a.shape)
        assert np.all(actual[0][padded] == 0) and np.all(actual[1][padded] == 0)


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", [1, 3, 6])
def test_estimate_vjp(length, kind):
    rng = np.random.default_rng(length + 10)
    c = rng.standard_normal((2, 2, 2 * length - 1, 4))
    w = rng.standard_normal((2, 4))
    mask = make_mask(rng, 2, length, kind)
    ds = rng.standard_normal((2, 2, 2 * length - 1))
    no_pair = fsat.pair_counts(length, mask)[:, None, :] == 0
    actual = fsat.estimate_vjp(c, w, ds, key_padding_mask=mask)
    # s is a constant -inf where n_tau = 0: its cotangent there is ignored.
    clean = np.where(no_pair, 0.0, ds)
    expected = numerical_vjp(lambda c, w: fsat.estimate(c, w, key_padding_mask=mask), [c, w], clean, EPS)
    assert_grads(actual, expected)
    assert_grads(fsat.estimate_vjp(c, w, clean, key_padding_mask=mask), expected)


SPARSE_CASES = [
    # length, dim, dim_v, count
    (1, 2, 3, 1),
    (5, 3, 2, 3),
    (7, 2, 4, 5),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("length,dim,dim_v,count", SPARSE_CASES)
def test_sparse_attention_vjp(length, dim, dim_v, count, with_dlse, with_bias, kind, causal):
    rng = np.random.default_rng(length * 31 + count)
    q, k = rng.standard_normal((2, 2, 2, length, dim))
    v = rng.standard_normal((2, 2, length, dim_v))
    pool = np.arange(-(length - 1), length)
    offsets = np.array([[rng.choice(pool, size=count, replace=False) for _ in range(2)] for _ in range(2)])
    bias = rng.standard_normal((2, 2, count)) if with_bias else None
    if with_bias and count > 1:
        bias[0, 1, 0] = -np.inf  # an offset removed by its bias
    mask = make_mask(rng, 2, length, kind)
    dout = rng.standard_normal((2, 2, length, dim_v))
    dlse = rng.standard_normal((2, 2, length)) if with_dlse else None
    dq, dk, dv, dbias = fsat.sparse_attention_vjp(
        q, k, v, offsets, bias, dout, dlse=dlse, causal=causal, key_padding_mask=mask
    )
    _, lse = fsat.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    dlse_used = None if dlse is None else np.where(np.isfinite(lse), dlse, 0.0)  # ignored at lse = -inf
    params = [q, k, v] + ([bias] if with_bias else [])

    def f(q, k, v, bias=None):
        return fsat.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)

    expected = numerical_vjp(f, params, (dout, dlse_used), EPS)
    if with_bias:
        expected = list(expected)
        expected[3] = np.where(np.isfinite(bias), expected[3], 0.0)  # f is flat in a -inf bias (FD gives nan)
        assert_grads((dq, dk, dv, dbias), expected)
    else:
        assert dbias is None
        assert_grads((dq, dk, dv), expected)


def selection_margin(s, noise, top_k, causal):
    """Gap between the last selected and the first rejected candidate score (inf if none is rejected;
    two -inf scores never swap under a perturbation, so their gap counts as inf)."""
    length = (s.shape[2] + 1) // 2
    scores = s + (0.0 if noise is None else noise)
    tau = np.arange(-(length - 1), length)
    candidates = (tau < 0) if causal else (tau != 0)
    ranked = -np.sort(-scores[:, :, candidates], axis=-1)
    if top_k - 1 >= ranked.shape[-1]:
        return np.inf
    if top_k == 1:
        return np.inf
    last, first_out = ranked[:, :, top_k - 2], ranked[:, :, top_k - 1]
    gap = np.where(np.isneginf(last), np.inf, last - first_out)
    return np.min(gap)


def setup_attention(seed, *, length=7, dim=3, dim_v=2, dim_c=None, top_k=3, causal=False, kind="none", noisy=False):
    """Inputs of `attention` whose selection is stable under EPS perturbations (margin checked)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, 2, length, dim))
    v = rng.standard_normal((2, 2, length, dim_v))
    w = 2.0 + rng.standard_normal((2, dim_c or dim))  # a strong estimator: the cross path matters
    kw = {"causal": causal, "key_padding_mask": make_mask(rng, 2, length, kind)}
    if noisy:
        kw["noise"] = rng.gumbel(size=(2, 2, 2 * length - 1))
    if dim_c is not None:
        kw["cross_q"], kw["cross_k"] = rng.standard_normal((2, 2, 2, length, dim_c))
    a, b = kw.get("cross_q", q), kw.get("cross_k", k)
    s = fsat.estimate(fsat.cross(a, b, key_padding_mask=kw["key_padding_mask"]), w,
                      key_padding_mask=kw["key_padding_mask"])
    assert selection_margin(s, kw.get("noise"), top_k,
                            causal) > 1e-3, "seed gives a near-tie in the selection; pick another seed"
    dout = rng.standard_normal((2, 2, length, dim_v))
    return q, k, v, w, top_k, dout, kw


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=1),
        dict(seed=2, causal=True),
        dict(seed=3, kind="random", noisy=True),
        dict(seed=7, length=5, dim=2, dim_v=3, dim_c=4, top_k=4),
        dict(seed=5, length=6, dim_c=2, causal=True, kind="random", top_k=2),
        dict(seed=6, length=1, dim_c=2, top_k=3),
    ],
    ids=["plain", "causal", "padded-noisy", "cross", "cross-causal-padded", "cross-L1"],
)
def test_attention_vjp_matches_finite_differences_where_not_truncated(case):
    """v and w always, and the given cross inputs, equal finite differences of the full attention;
    with given cross inputs q and k enter only the sparse attention, so theirs do too."""
    q, k, v, w, top_k, dout, kw = setup_attention(**case)
    grads = fsat.attention_vjp(q, k, v, w, top_k, dout, **kw)
    assert isinstance(grads, fsat.FSATGrads)
    separate = "cross_q" in kw
    cross_inputs = [kw.pop("cross_q"), kw.pop("cross_k")] if separate else []

    def f(q, k, v, w, *cross):
        extra = {"cross_q": cross[0], "cross_k": cross[1]} if cross else {}
        return fsat.attention(q, k, v, w, top_k, **kw, **extra)

    expected = numerical_vjp(f, [q, k, v, w, *cross_inputs], dout, EPS)
    assert_grads((grads.v, grads.w), (expected[2], expected[3]))
    if separate:
        assert_grads((grads.q, grads.k, grads.cross_q, grads.cross_k),
                     (expected[0], expected[1], expected[4], expected[5]))
        if q.shape[2] > 1:  # at L = 1 the output is v whatever the estimate
            assert np.abs(grads.cross_q).max() > 1e-3  # the estimator path is exercised
    else:
        assert grads.cross_q is None and grads.cross_k is None


@pytest.mark.parametrize(
    "case",
    [dict(seed=1), dict(seed=2, causal=True), dict(seed=3, kind="random", noisy=True)],
    ids=["plain", "causal", "padded-noisy"],
)
def test_attention_vjp_truncates_the_cross_path_from_q_and_k(case):
    q, k, v, w, top_k, dout, kw = setup_attention(**case)
    grads = fsat.attention_vjp(q, k, v, w, top_k, dout, **kw)
    mask = kw["key_padding_mask"]
    length = q.shape[2]
    s = fsat.estimate(fsat.cross(q, k, key_padding_mask=mask), w, key_padding_mask=mask)
    offsets = fsat.select(s, top_k, causal=kw["causal"], noise=kw.get("noise"))
    bias = np.take_along_axis(s, offsets + length - 1, axis=2)
    # dq, dk: exactly the sparse attention's at the fixed offsets and bias ...
    dq, dk, dv, dbias = fsat.sparse_attention_vjp(q, k, v, offsets, bias, dout, causal=kw["causal"],
                                                  key_padding_mask=mask)
    np.testing.assert_array_equal(grads.q, dq)
    np.testing.assert_array_equal(grads.k, dk)
    np.testing.assert_array_equal(grads.v, dv)
    # ... which are the finite differences with the offsets and bias held fixed,
    fixed = numerical_vjp(
        lambda q, k: fsat.sparse_attention(q, k, v, offsets, bias, causal=kw["causal"], key_padding_mask=mask)[0],
        [q, k], dout, EPS,
    )
    assert_grads((grads.q, grads.k), fixed)
    # ... and not the finite differences of the full attention, whose bias moves with q and k.
    full = numerical_vjp(lambda q, k: fsat.attention(q, k, v, w, top_k, **kw), [q, k], dout, EPS)
    assert np.abs(grads.q - full[0]).max() > 1e-3
    assert np.abs(grads.k - full[1]).max() > 1e-3
    # The difference is exactly the cross path: estimate_vjp -> cross_vjp of the bias cotangent.
    ds = np.zeros_like(s)
    np.put_along_axis(ds, offsets + length - 1, dbias, axis=2)
    dc, _ = fsat.estimate_vjp(fsat.cross(q, k, key_padding_mask=mask), w, ds, key_padding_mask=mask)
    da, db = fsat.cross_vjp(q, k, dc, key_padding_mask=mask)
    assert_grads((grads.q + da, grads.k + db), full)
