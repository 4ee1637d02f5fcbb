"""The PyTorch FSAT backend (backends/torch/fsat/) against the NumPy reference ``refattn.fsat``.

Every function is compared with the reference on float64 NumPy copies of its inputs: float64 to the
float64 row of the tolerance table of spec/interface.md, float32/bfloat16/float16 to their rows
(inputs rounded to the dtype first, then promoted to float64 for the reference). Discrete outputs
(offsets, pair counts) must be equal. Autograd gradients are compared with the reference VJPs.
"""

from __future__ import annotations

import importlib
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from refattn import checks  # noqa: E402
from refattn import fsat as ref  # noqa: E402
from refattn.backends.torch import fsat as F  # noqa: E402
from refattn.backends.torch import kernels  # noqa: E402
from refattn.backends.torch.fsat.sparse_attention import (  # noqa: E402
    GatheredShift,
    SlicedShift,
    forced_path,
    path_for,
    shifts,
)
from refattn.conformance.tolerances import FORWARD, GRADIENT  # noqa: E402
from refattn.fsat.select import candidate_order  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------ helpers


def T(x, dtype="float64", device="cpu"):
    """NumPy -> torch (floats cast to ``dtype``); None passes through."""
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.is_floating_point():
        t = t.to(DTYPES[dtype])
    return t.to(device)


def N(t):
    """torch -> float64/int64 NumPy (what the reference is fed and compared with)."""
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` and back to float64: the reference's input for that dtype."""
    return None if x is None else N(T(x, dtype))


def assert_close(actual, expected, tol, what=""):
    actual = N(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.array_equal(np.isneginf(actual), np.isneginf(expected)), f"{what}: -inf pattern differs"
    finite = np.isfinite(expected)
    assert np.all(np.isfinite(actual[finite])), f"{what}: non-finite values"
    err = np.abs(actual[finite] - expected[finite])
    bound = tol.atol + tol.rtol * np.abs(expected[finite])
    assert np.all(err <= bound), f"{what}: max abs err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def assert_grads(actual, expected, tol):
    assert len(actual) == len(expected)
    for index, (x, y) in enumerate(zip(actual, expected, strict=True)):
        if y is None:
            assert x is None, index
        else:
            assert_close(x, y, tol, f"gradient {index}")


def make_mask(rng, batch, length, kind):
    if kind == "none":
        return None
    mask = rng.random((batch, length)) < 0.3
    if kind == "full-row":
        mask[-1] = True
    return mask


def gumbel(rng, batch, heads, length):
    return rng.gumbel(size=(batch, heads, 2 * length - 1))


def problem(seed, batch=2, heads=3, length=9, dim=5, dim_v=4, *, mask="none", noise=False, cross=None):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, batch, heads, length, dim))
    v = rng.standard_normal((batch, heads, length, dim_v))
    features = dim if cross is None else cross
    w = 1.0 + 0.5 * rng.standard_normal((heads, features))
    kw = dict(key_padding_mask=make_mask(rng, batch, length, mask))
    kw["noise"] = gumbel(rng, batch, heads, length) if noise else None
    if cross is not None:
        kw["cross_q"], kw["cross_k"] = rng.standard_normal((2, batch, heads, length, cross))
    dout = rng.standard_normal((batch, heads, length, dim_v))
    return rng, q, k, v, w, kw, dout


def torch_kw(kw, dtype="float64", device="cpu"):
    return {name: T(value, dtype, device) if isinstance(value, np.ndarray) else value for name, value in kw.items()}


def selection_margin(q, k, w, top_k, causal, kw):
    """Gap between the (K-1)-th and K-th best candidate of s + g in the reference (inf if no K-th)."""
    crossed = kw.get("cross_q") is not None
    a, b = (kw["cross_q"], kw["cross_k"]) if crossed else (q, k)
    c = ref.cross(a, b, key_padding_mask=kw["key_padding_mask"])
    s = ref.estimate(c, w, key_padding_mask=kw["key_padding_mask"])
    if kw.get("noise") is not None:
        s = s + kw["noise"]
    length = q.shape[2]
    cand = candidate_order(length, causal=causal) + (length - 1)
    scores = np.sort(s[:, :, cand], axis=-1)[:, :, ::-1]
    if top_k - 1 >= scores.shape[2] or top_k == 1:
        return np.inf
    upper, lower = scores[:, :, top_k - 2], scores[:, :, top_k - 1]
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are -inf: no tie to break there
        gap = np.where(np.isneginf(upper), np.inf, upper - lower)
    return float(np.min(gap))


SHAPES = [  # (B, H, L, D, Dv)
    (2, 2, 1, 3, 2),  # L = 1
    (2, 3, 2, 1, 3),
    (2, 2, 7, 5, 4),  # prime L, odd D
    (1, 2, 13, 3, 5),  # prime L
    (2, 2, 16, 4, 4),  # power of two
]


# ------------------------------------------------------------------------------ step 1: the cross


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("length", [1, 2, 7, 16])
def test_pair_counts(length, kind):
    rng = np.random.default_rng(length)
    mask = make_mask(rng, 3, length, kind)
    actual = F.pair_counts(length, None if mask is None else torch.from_numpy(mask))
    assert actual.dtype == torch.int64
    np.testing.assert_array_equal(actual.numpy(), ref.pair_counts(length, mask))


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_and_vjp(shape, kind):
    batch, heads, length, dim, _ = shape
    rng = np.random.default_rng(sum(shape))
    a, b = rng.standard_normal((2, batch, heads, length, dim))
    mask = make_mask(rng, batch, length, kind)
    dc = rng.standard_normal((batch, heads, 2 * length - 1, dim))
    M = T(mask)
    c = F.cross(T(a), T(b), key_padding_mask=M)
    assert c.dtype == torch.float64
    assert_close(c, ref.cross(a, b, key_padding_mask=mask), FORWARD["float64"], "c")
    expected = ref.cross_vjp(a, b, dc, key_padding_mask=mask)
    assert_grads(F.cross_vjp(T(a), T(b), T(dc), key_padding_mask=M), expected, GRADIENT["float64"])
    # cross is differentiable with autograd, and its backward is the VJP
    ta, tb = T(a).requires_grad_(), T(b).requires_grad_()
    grads = torch.autograd.grad(F.cross(ta, tb, key_padding_mask=M), (ta, tb), T(dc))
    assert_grads(grads, expected, GRADIENT["float64"])


@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("shape", SHAPES)
def test_estimate_and_vjp(shape, kind):
    batch, heads, length, dim, _ = shape
    rng = np.random.default_rng(sum(shape) + 1)
    mask = make_mask(rng, batch, length, kind)
    c = rng.standard_normal((batch, heads, 2 * length - 1, dim))
    w = rng.standard_normal((heads, dim))
    ds = rng.standard_normal((batch, heads, 2 * length - 1))
    M = T(mask)
    assert_close(F.estimate(T(c), T(w), key_padding_mask=M), ref.estimate(c, w, key_padding_mask=mask),
                 FORWARD["float64"], "s")
    expected = ref.estimate_vjp(c, w, ds, key_padding_mask=mask)
    assert_grads(F.estimate_vjp(T(c), T(w), T(ds), key_padding_mask=M), expected, GRADIENT["float64"])
    tc, tw = T(c).requires_grad_(), T(w).requires_grad_()
    s = F.estimate(tc, tw, key_padding_mask=M)
    ds_t = torch.where(torch.isfinite(s), T(ds), torch.zeros(()).double())
    assert_grads(torch.autograd.grad(s, (tc, tw), ds_t), expected, GRADIENT["float64"])


# --------------------------------------------------------------------------------- step 2: select


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("length", [1, 2, 5, 16])
def test_select_matches_reference(length, noisy, causal):
    rng = np.random.default_rng(length * 4 + noisy * 2 + causal)
    s = rng.standard_normal((2, 3, 2 * length - 1))
    s[0, 0, :: 3] = -np.inf  # offsets without pairs are candidates too, taken last
    noise = gumbel(rng, 2, 3, length) if noisy else None
    for top_k in (1, 2, 3, length, 2 * length - 1, 2 * length + 5):
        actual = F.select(T(s), top_k, causal=causal, noise=T(noise))
        expected = ref.select(s, top_k, causal=causal, noise=noise)
        assert actual.dtype == torch.int64
        np.testing.assert_array_equal(actual.numpy(), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_select_tie_breaks(causal):
    """Heavily tied integer scores: smaller |tau| first, then the negative offset (exact match)."""
    rng = np.random.default_rng(7)
    length = 12
    s = rng.integers(0, 3, size=(3, 4, 2 * length - 1)).astype(np.float64)
    s[1] = 0.0  # everything tied
    s[2, :, ::2] = -np.inf
    for top_k in range(1, 2 * length + 1):
        np.testing.assert_array_equal(F.select(T(s), top_k, causal=causal).numpy(), ref.select(s, top_k, causal=causal))
    # all tied: tau = 0, then -1, 1, -2, 2, ...
    assert F.select(torch.zeros(1, 1, 2 * length - 1, dtype=torch.float64), 4).tolist() == [[[-2, -1, 0, 1]]]
    assert F.select(torch.zeros(1, 1, 2 * length - 1, dtype=torch.float64), 4,
                    causal=True).tolist() == [[[-3, -2, -1, 0]]]


# --------------------------------------------------------------------- step 3: sparse attention


def random_offsets(rng, batch, heads, length, count):
    pool = np.arange(-(length - 1), length)
    return np.stack([np.stack([rng.choice(pool, size=count,
                                          replace=False) for _ in range(heads)]) for _ in range(batch)])


SPARSE_CASES = [  # (L, D, Dv, K)
    (1, 3, 3, 1),
    (2, 1, 2, 2),
    (9, 4, 4, 4),
    (13, 5, 2, 6),  # prime L, odd D, Dv != D
    (16, 3, 7, 31),  # every offset
]


@pytest.mark.parametrize("path", ["fused", "sliced", "gathered"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("bias_kind", ["none", "finite", "with-inf"])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_attention_and_vjp(case, bias_kind, kind, causal, path):
    """Every path, each forced: the fused CPU kernels, slices (CPU without g++) and row gathers (GPU)."""
    with forced_path(path):
        _check_sparse_attention_and_vjp(case, bias_kind, kind, causal)


def _check_sparse_attention_and_vjp(case, bias_kind, kind, causal):
    length, dim, dim_v, count = case
    rng = np.random.default_rng(length * 1000 + count * 10 + len(bias_kind) + len(kind))
    q, k = rng.standard_normal((2, 2, 3, length, dim))
    v = rng.standard_normal((2, 3, length, dim_v))
    offsets = random_offsets(rng, 2, 3, length, count)  # unsorted, any order is allowed
    bias = None if bias_kind == "none" else rng.standard_normal((2, 3, count)) * 2
    if bias_kind == "with-inf":
        bias[0, 0, 0] = -np.inf
    mask = make_mask(rng, 2, length, kind)
    dout = rng.standard_normal(v.shape)
    dlse = rng.standard_normal((2, 3, length))
    M = T(mask)
    out, lse = F.sparse_attention(T(q), T(k), T(v), T(offsets), T(bias), causal=causal, key_padding_mask=M)
    ref_out, ref_lse = ref.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=mask)
    assert out.dtype == lse.dtype == torch.float64
    assert_close(out, ref_out, FORWARD["float64"], "out")
    assert_close(lse, ref_lse, FORWARD["float64"], "lse")
    expected = ref.sparse_attention_vjp(q, k, v, offsets, bias, dout, dlse=dlse, causal=causal, key_padding_mask=mask)
    actual = F.sparse_attention_vjp(T(q), T(k), T(v), T(offsets), T(bias), T(dout), dlse=T(dlse), causal=causal,
                                    key_padding_mask=M)
    assert_grads(actual, expected, GRADIENT["float64"])
    # autograd through both outputs; the cotangent of lse at -inf rows is ignored (as in the reference)
    leaves = [T(x).requires_grad_() for x in (q, k, v)] + ([T(bias).requires_grad_()] if bias is not None else [])
    out_t, lse_t = F.sparse_attention(*leaves[:3], T(offsets), leaves[3] if bias is not None else None, causal=causal,
                                      key_padding_mask=M)
    finite = torch.isfinite(lse_t)
    loss = (out_t * T(dout)).sum() + torch.where(finite, lse_t * T(dlse), torch.zeros(()).double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    assert_grads(list(grads) + ([None] if bias is None else []), expected, GRADIENT["float64"])


def test_forced_path_chooses_the_computation_on_any_device():
    offsets, x = torch.tensor([[[-1, 0, 2]]]), torch.zeros(1, 1, 4, 2)
    assert path_for(x) == "fused"  # a CPU's own choice where g++ builds the kernels
    assert {type(shift) for shift in shifts(offsets, 4, "sliced")} == {SlicedShift}
    assert {type(shift) for shift in shifts(offsets, 4, "gathered")} == {GatheredShift}
    with forced_path("gathered"):
        assert path_for(x) == "gathered"
        with forced_path("sliced"):
            assert path_for(x) == "sliced"
        assert path_for(x) == "gathered"
    assert path_for(x) == "fused"
    with pytest.raises(ValueError, match="kind: expected one of 'fused', 'sliced', 'gathered', got 'slices'"):
        with forced_path("slices"):
            pass
    expected = "the fused path cannot run: its kernels take float32 or float64 CPU tensors, got torch.float16 on cpu"
    with forced_path("fused"), pytest.raises(RuntimeError, match=expected):
        path_for(x.half())


def _fused_run(q, k, v, offsets, bias, mask, dout, dlse):
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    with forced_path("fused"):
        out, lse = F.sparse_attention(*leaves[:3], offsets, leaves[3], key_padding_mask=mask)
        grads = torch.autograd.grad((out * dout).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum(), leaves)
    return [out, lse, *grads]


def test_fused_kernels_give_the_same_bits_on_any_number_of_threads():
    """Each row's results are computed by one thread, in one order: 1 and 2 threads agree bit for bit (9,006 rows:
    five blocks of work, the last one short)."""
    rng = np.random.default_rng(7)
    batch, heads, length, dim, count = 2, 3, 1501, 16, 7
    q, k, v, dout = (torch.from_numpy(x).float() for x in rng.standard_normal((4, batch, heads, length, dim)))
    offsets = torch.from_numpy(rng.integers(-length + 1, length, (batch, heads, count)))
    bias = torch.from_numpy(rng.standard_normal((batch, heads, count))).float()
    bias[0, 1, 2] = float("-inf")
    mask = torch.from_numpy(rng.random((batch, length)) < 0.2)
    dlse = torch.from_numpy(rng.standard_normal((batch, heads, length))).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused_run(q, k, v, offsets, bias, mask, dout, dlse)
        torch.set_num_threads(2)
        two = _fused_run(q, k, v, offsets, bias, mask, dout, dlse)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x, y)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 40), dim=st.integers(1, 9),
       dim_v=st.integers(1, 9), count=st.integers(1, 12), causal=st.booleans(), masked=st.booleans(),
       removed=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_kernels_match_the_sliced_path(batch, heads, length, dim, dim_v, count, causal, masked, removed, seed):
    """Any shape (L = 1, every offset, Dv != D), causal or not, padded rows, offsets removed by a -inf bias:
    the fused kernels' outputs and gradients equal the sliced path's to rounding."""
    rng = np.random.default_rng(seed)
    q, k = (T(x) for x in rng.standard_normal((2, batch, heads, length, dim)))
    v, dout = (T(x) for x in rng.standard_normal((2, batch, heads, length, dim_v)))
    count = min(count, 2 * length - 1)  # distinct offsets in [-(L - 1), L - 1]
    offsets = torch.from_numpy(np.array([[rng.permutation(np.arange(-length + 1, length))[:count]
                                          for _ in range(heads)] for _ in range(batch)]))
    bias = T(rng.standard_normal((batch, heads, count)))
    if removed:
        bias[..., 0] = float("-inf")
    mask = torch.from_numpy(rng.random((batch, length)) < 0.3) if masked else None
    dlse = T(rng.standard_normal((batch, heads, length)))
    results = {}
    for path in ("fused", "sliced"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
        with forced_path(path):
            out, lse = F.sparse_attention(*leaves[:3], offsets, leaves[3], causal=causal, key_padding_mask=mask)
            finite = torch.isfinite(lse)
            loss = (out * dout).sum() + torch.where(finite, lse * dlse, torch.zeros((), dtype=lse.dtype)).sum()
            results[path] = [out, lse, *torch.autograd.grad(loss, leaves)]
    for fused, sliced in zip(results["fused"], results["sliced"], strict=True):
        torch.testing.assert_close(fused, sliced, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(1, 300), dim=st.integers(1, 12),
       reverse=st.booleans(), dtype=st.sampled_from(["float32", "float64"]), data=st.data())
def test_padded_rows_kernel_matches_the_torch_copy(batch, heads, length, dim, reverse, dtype, data):
    """fsat_cross.cpp's transposing copy against torch's, bit for bit: one head's block of features (a strided
    view), reversed or not, lengths that its tiles of 64 do not divide, the padding left as it was."""
    cross = importlib.import_module("refattn.backends.torch.fsat.cross")
    head = data.draw(st.integers(0, heads - 1))
    first = data.draw(st.integers(0, dim - 1))
    last = data.draw(st.integers(first + 1, dim))
    x = T(np.random.default_rng(length).standard_normal((batch, heads, length, dim)), dtype)
    part = x[:, head : head + 1, :, first:last]
    n = cross.fft_length(length) + 3
    rows = {}
    for use in (True, False):
        with kernels.forced(use):
            out = torch.full((batch, 1, last - first, n), 7.0, dtype=x.dtype)  # "padding" the copy must not touch
            rows[use] = cross.padded_rows(part, n, reverse=reverse, out=out)
    assert torch.equal(rows[True], rows[False])
    expected = part.transpose(2, 3).flip(3) if reverse else part.transpose(2, 3)
    assert torch.equal(rows[True][..., :length], expected) and bool((rows[True][..., length:] == 7).all())


def _spectrum_operands(batch, heads, length, features, dtype, seed):
    """a and b (B, H, L, F) as strided views (positions outermost, features cut from a wider row) and w (H, F)."""
    rng = np.random.default_rng(seed)
    wide = T(rng.standard_normal((2, batch, length, heads, features + 3)), dtype)
    a, b = (x.permute(0, 2, 1, 3)[..., 1 : features + 1] for x in wide)
    return a, b, T(rng.standard_normal((heads, features)), dtype)


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 300), features=st.integers(1, 40),
       dtype=st.sampled_from(["float32", "float64"]), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_spectrum_kernel_matches_torch_fft(batch, heads, length, features, dtype, masked, seed):
    """fsat_spectrum.cpp's w-weighted spectrum against torch.fft's (WeightedCross's torch path): strided views,
    padded rows, several chunks of features (16 in float32, 8 in float64) and a short last one. The bound is
    rounding relative to sum_d |w_d| |a_d|_1 |b_d|_1, which bounds every bin."""
    estimate = importlib.import_module("refattn.backends.torch.fsat.estimate")
    a, b, w = _spectrum_operands(batch, heads, length, features, dtype, seed)
    unpadded = ~torch.from_numpy(np.random.default_rng(seed).random((batch, length)) < 0.3) if masked else None
    a, b = (estimate.zero_padded(x, unpadded) for x in (a, b))
    n = estimate.fft_length(length)
    got = kernels.weighted_spectrum(a, b, w, n)
    expected = estimate.weighted_spectrum(w, a, b, None)
    scale = (w.abs()[None] * a.abs().sum(dim=2) * b.abs().sum(dim=2)).sum(dim=-1, keepdim=True)  # (B, H, 1)
    difference = (got - expected).abs()
    error = torch.where(scale > 0, difference / scale, difference)  # every row padded: both must be 0
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float(error.max()) < {"float32": 1e-5, "float64": 1e-13}[dtype]


def test_spectrum_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Each bin sums its features in the order of d whatever the threads: 1 and 2 threads agree bit for bit."""
    a, b, w = _spectrum_operands(2, 2, 3000, 37, "float32", 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.weighted_spectrum(a, b, w, 6000)
        torch.set_num_threads(2)
        two = kernels.weighted_spectrum(a, b, w, 6000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_without_mkl_the_spectra_take_torch_fft(monkeypatch):
    """A torch without MKL: the spectrum kernel says why and WeightedCross takes torch.fft (the same scores to
    rounding), while the other kernels still run; required, it raises with the reason."""
    estimate = importlib.import_module("refattn.backends.torch.fsat.estimate")
    a, b, w = _spectrum_operands(1, 2, 50, 20, "float64", 2)
    with_mkl = estimate.WeightedCross.apply(w, a, b, None)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    kernels._library.cache_clear()
    try:
        reason = kernels.unavailable("fsat_spectrum")
        assert reason == ("the torch backend's CPU kernels (fsat_spectrum.cpp) needs a torch built with MKL "
                          "(torch.backends.mkl.is_available() is False)")
        assert kernels.unavailable() is None and kernels.available(a) and not kernels.available(a, "fsat_spectrum")
        torch.testing.assert_close(estimate.WeightedCross.apply(w, a, b, None), with_mkl, rtol=1e-12, atol=1e-12)
        with kernels.forced(True), pytest.raises(RuntimeError, match=re.escape(f"cannot run: {reason}")):
            kernels.available(a, "fsat_spectrum")
    finally:
        kernels._library.cache_clear()


def test_spectrum_kernel_takes_rows_up_to_its_bound(monkeypatch):
    """WeightedCross takes the kernel while N entries of a's dtype fit KERNEL_ROW_BYTES, torch.fft beyond."""
    estimate = importlib.import_module("refattn.backends.torch.fsat.estimate")
    calls = []
    original = kernels.weighted_spectrum
    monkeypatch.setattr(kernels, "weighted_spectrum", lambda *args: calls.append(args[3]) or original(*args))
    monkeypatch.setattr(estimate, "KERNEL_ROW_BYTES", 64 * 8)
    for length in (32, 33):  # N = 64 (512 bytes of float64), then N = 72
        a, b, w = _spectrum_operands(1, 1, length, 3, "float64", length)
        with_kernel = estimate.WeightedCross.apply(w, a, b, None)
        with kernels.forced(False):
            torch.testing.assert_close(with_kernel, estimate.WeightedCross.apply(w, a, b, None), rtol=1e-12,
                                       atol=1e-12)
    assert calls == [64]


def test_kernel_sources_are_checked():
    with pytest.raises(ValueError, match="source"):
        kernels.unavailable("fsat_fft")


def test_without_a_compiler_the_cpu_path_is_sliced(monkeypatch, tmp_path):
    """No g++ on PATH (and no build in the cache): the kernels say why, a CPU call pairs rows by slices and
    gives the fused path's results, and forcing the fused path names the missing compiler."""
    rng = np.random.default_rng(3)
    q, k, v = (T(x) for x in rng.standard_normal((3, 1, 2, 9, 4)))
    offsets = torch.tensor([[[0, -2, 3], [1, 8, -8]]])
    fused, _ = F.sparse_attention(q, k, v, offsets)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("REFATTN_CACHE_DIR", str(tmp_path))
    kernels._library.cache_clear()
    try:
        missing = r"building the torch backend's CPU kernels \(\w+\.cpp\) needs g\+\+ .*"
        assert re.fullmatch(missing, kernels.unavailable())
        assert path_for(q) == "sliced"
        sliced, _ = F.sparse_attention(q, k, v, offsets)
        torch.testing.assert_close(sliced, fused, rtol=1e-13, atol=1e-15)
        with forced_path("fused"), pytest.raises(RuntimeError, match="the fused path cannot run: .*needs g.. "):
            F.sparse_attention(q, k, v, offsets)
    finally:
        kernels._library.cache_clear()


def test_an_unwritable_cache_leaves_the_cpu_on_the_sliced_path(monkeypatch, tmp_path):
    """A cache folder that cannot be created: the kernels say where and why, and CPU calls pair rows by slices."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("REFATTN_CACHE_DIR", str(blocker))
    kernels._library.cache_clear()
    try:
        assert f"cannot be built or loaded in {blocker / 'torch-cpu'}" in kernels.unavailable()
        assert path_for(torch.zeros(1, 1, 2, 2)) == "sliced"
    finally:
        kernels._library.cache_clear()


def test_sparse_attention_saves_no_l_by_k_by_d_tensor():
    """Forward + backward of attention: every tensor autograd saves is at most (B, H, L, max(D, Dv)),
    (B, H, L, K) (the probabilities) or (B, H, 2L - 1, Dc) big: nothing of size L x K x D is kept."""
    batch, heads, length, dim, count = 2, 2, 64, 8, 16
    rng = np.random.default_rng(0)
    q, k, v = (T(x).requires_grad_() for x in rng.standard_normal((3, batch, heads, length, dim)))
    w = torch.ones(heads, dim, dtype=torch.float64, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.attention(q, k, v, w, count)
    out.sum().backward()
    assert max(sizes) <= batch * heads * max((2 * length - 1) * dim, length * count)
    assert max(sizes) < batch * heads * length * count * dim // 4


# ------------------------------------------------------------------------- the whole pipeline

ATTENTION_CASES = [  # (shape, top_k, mask, noise, cross, causal)
    ((2, 2, 1, 3, 2), 4, "none", False, None, False),  # L = 1
    ((2, 2, 1, 3, 2), 1, "none", True, 3, True),
    ((2, 3, 7, 5, 4), 3, "none", False, None, False),  # prime L, odd D
    ((2, 3, 7, 5, 4), 3, "none", False, None, True),
    ((2, 3, 7, 5, 4), 4, "random", True, None, False),
    ((2, 3, 7, 5, 4), 4, "full-row", True, None, True),
    ((2, 2, 13, 3, 5), 5, "random", True, 2, False),  # separate cross inputs
    ((2, 2, 13, 3, 5), 5, "random", True, 2, True),
    ((1, 2, 16, 4, 4), 6, "none", True, None, True),
    ((2, 2, 11, 3, 3), 40, "random", False, None, False),  # K larger than the candidates
]


def _attention_problem(case, seed=0, dtype="float64"):
    """Inputs of one attention case, rounded to ``dtype`` (float64 NumPy arrays), from the first
    seed whose selection is tie-free by a margin of 1e-3 (well above every dtype's error in s)."""
    shape, top_k, mask, noise, cross, causal = case
    batch, heads, length, dim, dim_v = shape
    for attempt in range(100):
        rng, q, k, v, w, kw, dout = problem(1000 * seed + attempt + sum(shape), batch, heads, length, dim, dim_v,
                                            mask=mask, noise=noise, cross=cross)
        q, k, v, w, dout = (rounded(x, dtype) for x in (q, k, v, w, dout))
        kw = {name: rounded(x, dtype) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x for name,
              x in kw.items()}
        if selection_margin(q, k, w, top_k, causal, kw) > 1e-3:
            return q, k, v, w, top_k, dict(kw, causal=causal), dout
    raise RuntimeError("no tie-free seed")


@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=lambda c: f"{c[0]}-K{c[1]}-{c[2]}-noise{c[3]}-cross{c[4]}-causal{c[5]}")
def test_attention_forward_vjp_and_autograd(case):
    q, k, v, w, top_k, kw, dout = _attention_problem(case)
    tkw = torch_kw(kw)
    out = F.attention(T(q), T(k), T(v), T(w), top_k, **tkw)
    assert out.dtype == torch.float64
    assert_close(out, ref.attention(q, k, v, w, top_k, **kw), FORWARD["float64"], "out")
    expected = ref.attention_vjp(q, k, v, w, top_k, dout, **kw)
    actual = F.attention_vjp(T(q), T(k), T(v), T(w), top_k, T(dout), **tkw)
    assert isinstance(actual, ref.FSATGrads)
    assert_grads(actual, expected, GRADIENT["float64"])
    # autograd
    leaves = [T(x).requires_grad_() for x in (q, k, v, w)]
    if tkw.get("cross_q") is not None:
        tkw["cross_q"] = tkw["cross_q"].requires_grad_()
        tkw["cross_k"] = tkw["cross_k"].requires_grad_()
        leaves += [tkw["cross_q"], tkw["cross_k"]]
    grads = torch.autograd.grad(F.attention(*leaves[:4], top_k, **tkw), leaves, T(dout))
    assert_grads(list(grads) + [None] * (6 - len(grads)), expected, GRADIENT["float64"])


def test_attention_with_offsets_returns_the_selected_offsets():
    q, k, v, w, top_k, kw, _ = _attention_problem(ATTENTION_CASES[4])
    out, offsets = F.attention_with_offsets(T(q), T(k), T(v), T(w), top_k, **torch_kw(kw))
    c = ref.cross(q, k, key_padding_mask=kw["key_padding_mask"])
    s = ref.estimate(c, w, key_padding_mask=kw["key_padding_mask"])
    np.testing.assert_array_equal(offsets.numpy(), ref.select(s, top_k, causal=kw["causal"], noise=kw["noise"]))
    assert torch.equal(out, F.attention(T(q), T(k), T(v), T(w), top_k, **torch_kw(kw)))


# ------------------------------------------------------------------------- gradient truncation


@pytest.mark.parametrize("crossed", [False, True])
def test_gradient_truncation(crossed):
    """q and k get gradient only through the sparse attention; w through the bias; the cross inputs
    through the estimator; and the untruncated gradient (through the cross as well) differs."""
    case = ((2, 2, 9, 4, 4), 4, "random", True, 3 if crossed else None, True)
    q, k, v, w, top_k, kw, dout = _attention_problem(case)
    tkw = torch_kw(kw)
    leaves = [T(x).requires_grad_() for x in (q, k, v, w)]
    if crossed:
        tkw["cross_q"] = tkw["cross_q"].requires_grad_()
        tkw["cross_k"] = tkw["cross_k"].requires_grad_()
    out, offsets = F.attention_with_offsets(*leaves[:4], top_k, **tkw)
    out.backward(T(dout))
    tq, tk, tv, tw = leaves
    # the sparse attention alone, at the same offsets and bias, gives the same dq, dk, dv
    a = tkw["cross_q"] if crossed else T(q)
    b = tkw["cross_k"] if crossed else T(k)
    mask = tkw["key_padding_mask"]
    s = F.estimate(F.cross(a.detach(), b.detach(), key_padding_mask=mask), T(w), key_padding_mask=mask)
    bias = torch.gather(s, 2, offsets + (q.shape[2] - 1))
    dq, dk, dv, dbias = F.sparse_attention_vjp(T(q), T(k), T(v), offsets, bias, T(dout), causal=True,
                                               key_padding_mask=mask)
    for got, want in ((tq.grad, dq), (tk.grad, dk), (tv.grad, dv)):
        assert_close(got, N(want), GRADIENT["float64"])
    assert float(dbias.abs().max()) > 0 and float(tw.grad.abs().max()) > 0  # w learns through the bias
    if crossed:
        assert float(tkw["cross_q"].grad.abs().max()) > 0 and float(tkw["cross_k"].grad.abs().max()) > 0
    else:
        # the untruncated pipeline (gradient through cross(q, k) as well) gives a different dq
        uq, uk = T(q).requires_grad_(), T(k).requires_grad_()
        s_full = F.estimate(F.cross(uq, uk, key_padding_mask=mask), T(w), key_padding_mask=mask)
        bias_full = torch.gather(s_full, 2, offsets + (q.shape[2] - 1))
        out_full, _ = F.sparse_attention(uq, uk, T(v), offsets, bias_full, causal=True, key_padding_mask=mask)
        out_full.backward(T(dout))
        assert torch.allclose(out_full, out)
        assert float((uq.grad - tq.grad).abs().max()) > 1e-6
        # ... by exactly the cross path: cross_vjp(q, k, dc) with (dc, dw) = estimate_vjp(c, w, ds)
        ds = torch.zeros_like(s).scatter(2, offsets + (q.shape[2] - 1), dbias)
        c = F.cross(T(q), T(k), key_padding_mask=mask)
        dc, dw = F.estimate_vjp(c, T(w), ds, key_padding_mask=mask)
        assert_close(tw.grad, N(dw), GRADIENT["float64"], "dw")
        via_cross = F.cross_vjp(T(q), T(k), dc, key_padding_mask=mask)
        assert_close(uq.grad - tq.grad, N(via_cross[0]), GRADIENT["float64"], "dq cross path")
        assert_close(uk.grad - tk.grad, N(via_cross[1]), GRADIENT["float64"], "dk cross path")
    # the offsets are integers: no gradient
    assert not offsets.requires_grad and offsets.dtype == torch.int64


# ------------------------------------------------------------------------------ reduced precision


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", [ATTENTION_CASES[3], ATTENTION_CASES[5], ATTENTION_CASES[7], ATTENTION_CASES[8]],
                         ids=["causal", "padded-noise", "cross", "L16"])
def test_attention_reduced_precision(case, dtype):
    """Inputs rounded to ``dtype`` and promoted to float64 for the reference; the table's tolerances."""
    rq, rk, rv, rw, top_k, rkw, rdout = _attention_problem(case, seed=1, dtype=dtype)
    tkw = torch_kw(rkw, dtype)
    out = F.attention(T(rq, dtype), T(rk, dtype), T(rv, dtype), T(rw, dtype), top_k, **tkw)
    assert out.dtype == DTYPES[dtype]
    assert_close(out, ref.attention(rq, rk, rv, rw, top_k, **rkw), FORWARD[dtype], "out")
    expected = ref.attention_vjp(rq, rk, rv, rw, top_k, rdout, **rkw)
    actual = F.attention_vjp(T(rq, dtype), T(rk, dtype), T(rv, dtype), T(rw, dtype), top_k, T(rdout, dtype), **tkw)
    assert all(g is None or g.dtype == DTYPES[dtype] for g in actual)
    assert_grads(actual, expected, GRADIENT[dtype])
    leaves = [T(x, dtype).requires_grad_() for x in (rq, rk, rv, rw)]
    if tkw.get("cross_q") is not None:
        tkw["cross_q"] = tkw["cross_q"].requires_grad_()
        tkw["cross_k"] = tkw["cross_k"].requires_grad_()
        leaves += [tkw["cross_q"], tkw["cross_k"]]
    grads = torch.autograd.grad(F.attention(*leaves[:4], top_k, **tkw), leaves, T(rdout, dtype))
    assert_grads(list(grads) + [None] * (6 - len(grads)), expected, GRADIENT[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_steps_reduced_precision(dtype):
    rng = np.random.default_rng(3)
    batch, heads, length, dim = 2, 2, 13, 5
    q, k, v = (rounded(x, dtype) for x in rng.standard_normal((3, batch, heads, length, dim)))
    w = rounded(rng.standard_normal((heads, dim)), dtype)
    mask = make_mask(rng, batch, length, "random")
    M = T(mask)
    c = F.cross(T(q, dtype), T(k, dtype), key_padding_mask=M)
    assert c.dtype == DTYPES[dtype]
    ref_c = ref.cross(q, k, key_padding_mask=mask)
    assert_close(c, ref_c, FORWARD[dtype], "c")
    rc = rounded(ref_c, dtype)
    assert_close(F.estimate(T(rc, dtype), T(w, dtype), key_padding_mask=M), ref.estimate(rc, w, key_padding_mask=mask),
                 FORWARD[dtype], "s")
    offsets = random_offsets(rng, batch, heads, length, 5)
    bias = rounded(rng.standard_normal((batch, heads, 5)), dtype)
    out, lse = F.sparse_attention(T(q, dtype), T(k, dtype), T(v, dtype), T(offsets), T(bias, dtype), key_padding_mask=M)
    ref_out, ref_lse = ref.sparse_attention(q, k, v, offsets, bias, key_padding_mask=mask)
    assert out.dtype == lse.dtype == DTYPES[dtype]
    assert_close(out, ref_out, FORWARD[dtype], "out")
    assert_close(lse, ref_lse, FORWARD[dtype], "lse")
    dout = rounded(rng.standard_normal(v.shape), dtype)
    assert_grads(
        F.sparse_attention_vjp(T(q, dtype), T(k, dtype), T(v, dtype), T(offsets), T(bias, dtype), T(dout, dtype),
                               key_padding_mask=M),
        ref.sparse_attention_vjp(q, k, v, offsets, bias, dout, key_padding_mask=mask),
        GRADIENT[dtype],
    )


# ------------------------------------------------------------------------------ torch.compile


def test_torch_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    q, k, v, w, top_k, kw, dout = _attention_problem(ATTENTION_CASES[5])
    tkw = torch_kw(kw)

    def run(fn):
        leaves = [T(x).requires_grad_() for x in (q, k, v, w)]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, T(dout)))

    def f(q, k, v, w):
        return F.attention(q, k, v, w, top_k, **tkw)

    eager = run(f)
    compiled = run(torch.compile(f, backend="inductor"))
    for x, y in zip(compiled, eager, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ bad inputs


def _good():
    rng = np.random.default_rng(0)
    q, k, v = (T(x) for x in rng.standard_normal((3, 2, 2, 5, 3)))
    return q, k, v, torch.ones(2, 3, dtype=torch.float64)


def test_rejects_numpy_arrays():
    q, k, v, w = _good()
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor, got ndarray"):
        F.attention(q.numpy(), k, v, w, 2)


def test_rejects_integer_dtype():
    q, k, v, w = _good()
    with pytest.raises(TypeError, match=r"k: expected a real floating-point tensor, got dtype torch.int64"):
        F.attention(q, k.long(), v, w, 2)


def test_rejects_complex_dtype():
    q, k, v, w = _good()
    with pytest.raises(TypeError, match=r"a: expected a real floating-point tensor"):
        F.cross(q.to(torch.complex128), k)


def test_rejects_wrong_rank():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \(B, H, L, D\), got shape \(2, 5, 3\)"):
        F.attention(q[0], k, v, w, 2)


def test_rejects_mismatched_shapes():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"k: expected shape \(B, H, L, D\) = \(2, 2, 5, 3\), got \(2, 2, 4, 3\)"):
        F.attention(q, k[:, :, :4], v, w, 2)


def test_rejects_empty_axis():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"v: expected every axis"):
        F.sparse_attention(q, k, v[..., :0], torch.zeros(2, 2, 1, dtype=torch.long))


def test_rejects_nan():
    q, k, v, w = _good()
    q = q.clone()
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"q: expected finite values, got 1 NaN or Inf entries"):
        F.attention(q, k, v, w, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_is_exact_when_the_sum_overflows(dtype):
    """The finite check (refattn.checks on tensors, as the backend runs it) sums first; a sum that
    overflows from finite entries must not be an error, and a single Inf, -Inf or NaN among huge
    finite entries must be."""
    huge = torch.full((4, 64), torch.finfo(dtype).max, dtype=dtype)
    if dtype in (torch.float64, torch.float32):  # half types are summed in float32: no overflow
        assert not torch.isfinite(huge.sum(dtype=dtype))
    assert checks.float_array(huge, "x") is huge
    for bad in (float("inf"), float("-inf"), float("nan")):
        spoiled = huge.clone()
        spoiled[1, 2] = bad
        with pytest.raises(ValueError, match=r"x: expected finite values, got 1 NaN or Inf entries"):
            checks.float_array(spoiled, "x")


def test_rejects_inf_noise():
    q, k, v, w = _good()
    noise = torch.zeros(2, 2, 9, dtype=torch.float64)
    noise[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"noise: expected finite values"):
        F.attention(q, k, v, w, 2, noise=noise)


def test_rejects_bad_noise_shape():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, H, 2L - 1\)"):
        F.attention(q, k, v, w, 2, noise=torch.zeros(2, 2, 5, dtype=torch.float64))


def test_rejects_bad_w_shape():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"w: expected shape \(H, Dc\) = \(2, 3\), got \(2, 4\)"):
        F.attention(q, k, v, torch.ones(2, 4, dtype=torch.float64), 2)


def test_rejects_non_bool_mask():
    q, k, v, w = _good()
    with pytest.raises(TypeError,
                       match=r"key_padding_mask: expected a bool tensor \(True = padding\), got dtype torch.int64"):
        F.attention(q, k, v, w, 2, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))


def test_rejects_bad_mask_shape():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(B, L\) = \(2, 5\), got \(2, 4\)"):
        F.attention(q, k, v, w, 2, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("top_k,error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_rejects_bad_top_k(top_k, error):
    q, k, v, w = _good()
    with pytest.raises(error, match=r"top_k: expected an integer"):
        F.attention(q, k, v, w, top_k)
    with pytest.raises(error, match=r"top_k: expected an integer"):
        F.select(torch.zeros(2, 2, 9, dtype=torch.float64), top_k)


def test_rejects_only_one_cross_input():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"cross_k: cross_q and cross_k must be given together"):
        F.attention(q, k, v, w, 2, cross_q=q)


def test_rejects_qkv_dtype_mismatch():
    q, k, v, w = _good()
    with pytest.raises(TypeError,
                       match=r"q, k, v: expected one floating-point dtype, got q torch.float64, k torch.float32"):
        F.attention(q, k.float(), v, w, 2)
    with pytest.raises(TypeError, match=r"expected one floating-point dtype"):
        F.sparse_attention(q, k, v.float(), torch.zeros(2, 2, 1, dtype=torch.long))


def test_rejects_mismatched_devices():
    """Only 'meta' vs 'cpu' is testable without a second device; the check runs before any other."""
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got q on cpu, k on meta"):
        F.attention(q, k.to("meta"), v, w, 2)
    with pytest.raises(ValueError, match=r"expected all tensors on one device"):
        F.cross(q, k, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: cpu vs cuda mismatch not testable")
def test_rejects_cpu_and_cuda_mix():  # pragma: no cover - needs CUDA
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"expected all tensors on one device"):
        F.attention(q, k.cuda(), v, w, 2)


def test_rejects_float_offsets():
    q, k, v, _ = _good()
    with pytest.raises(TypeError, match=r"offsets: expected an integer tensor, got dtype torch.float64"):
        F.sparse_attention(q, k, v, torch.zeros(2, 2, 1, dtype=torch.float64))


def test_rejects_out_of_range_offsets():
    q, k, v, _ = _good()
    with pytest.raises(ValueError,
                       match=r"offsets: expected offsets in \[-\(L-1\), L-1\] = \[-4, 4\], got values in \[0, 5\]"):
        F.sparse_attention(q, k, v, torch.tensor([0, 5]).expand(2, 2, 2))


def test_rejects_repeated_offsets():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match=r"offsets: expected distinct offsets"):
        F.sparse_attention(q, k, v, torch.tensor([1, 1]).expand(2, 2, 2))


def test_rejects_no_offsets():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match=r"offsets: expected at least one offset"):
        F.sparse_attention(q, k, v, torch.zeros(2, 2, 0, dtype=torch.long))


def test_rejects_positive_inf_bias():
    q, k, v, _ = _good()
    bias = torch.zeros(2, 2, 1, dtype=torch.float64)
    bias[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"bias: expected finite values or -inf"):
        F.sparse_attention(q, k, v, torch.zeros(2, 2, 1, dtype=torch.long), bias)


def test_rejects_nan_scores():
    s = torch.zeros(1, 1, 5, dtype=torch.float64)
    s[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"s: expected finite values or -inf, got NaN or \+Inf entries"):
        F.select(s, 2)


def test_rejects_even_offset_axis():
    with pytest.raises(ValueError, match=r"c: expected 2L - 1 offsets along axis 2 \(an odd number, L >= 1\), got 4"):
        F.estimate(torch.zeros(1, 1, 4, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))


def test_rejects_bad_length():
    with pytest.raises(ValueError, match=r"length: expected an integer >= 1, got 0"):
        F.pair_counts(0)


def test_rejects_wrong_dout_shape():
    q, k, v, w = _good()
    with pytest.raises(ValueError, match=r"dout: expected shape \(B, H, L, Dv\)"):
        F.attention_vjp(q, k, v, w, 2, torch.zeros(2, 2, 5, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------ overflow


def _huge(*shape, scale, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflow_of_the_cross_names_q_and_k(dtype):
    """The report: finite q of 1e20 in float32 (or bfloat16, computed in float32) gave NaN; the cross's
    products |q|·|k| reach 1e40."""
    q = _huge(1, 2, 16, 8, scale=1e20)
    with pytest.raises(ValueError, match=r"^q and k overflow float32 in the cross: \|q\|·\|k\| up to \d\.\de\+4\d$"):
        F.attention(q.to(dtype), q.to(dtype), (q / 1e20).to(dtype), torch.ones(2, 8), 4)
    with pytest.raises(ValueError, match=r"^q and k overflow float32 in the cross"):
        F.attention_vjp(q, q, q / 1e20, torch.ones(2, 8), 4, torch.ones(1, 2, 16, 8))
    with pytest.raises(ValueError, match=r"^a and b overflow float32 in the cross: \|a\|·\|b\|"):
        F.cross(q, q)


def test_overflow_of_the_estimate_names_q_k_and_w():
    """The cross is finite (|q|·|k| about 1e20) but w of 1e30 takes the scores beyond float32."""
    x, v = _huge(1, 2, 16, 8, scale=1e10), _huge(1, 2, 16, 8, scale=1.0, seed=1)
    w = torch.full((2, 8), 1e30)
    with pytest.raises(ValueError, match=r"^q, k and w overflow float32 in the estimate: \|q\|·\|k\|·\|w\|"):
        F.attention(x, x, v, w, 4)
    with pytest.raises(ValueError, match=r"^c and w overflow float32 in the estimate: \|c\|·\|w\|"):
        F.estimate(_huge(1, 2, 31, 8, scale=1e30), w)


def test_overflow_of_given_cross_inputs_names_them():
    v = _huge(1, 2, 16, 8, scale=1.0)
    big = _huge(1, 2, 16, 3, scale=1e20, seed=1)
    with pytest.raises(ValueError, match=r"^cross_q and cross_k overflow float32 in the cross"):
        F.attention(v, v, v, torch.ones(2, 3), 4, cross_q=big, cross_k=big)


def test_overflow_of_the_attention_logits_names_q_and_k():
    """Logits |q|·|k| of 1e40 in the sparse attention (its scores alone would be finite: one offset)."""
    q, v = _huge(1, 2, 16, 8, scale=1e20), _huge(1, 2, 16, 8, scale=1.0, seed=1)
    offsets = torch.tensor([-1, 0, 1]).expand(1, 2, 3)
    with pytest.raises(ValueError, match=r"^q and k overflow float32 in the sparse attention: \|q\|·\|k\|"):
        F.sparse_attention(q, q, v, offsets)


def test_overflow_of_the_gradients_names_the_cotangent():
    v = _huge(1, 2, 16, 8, scale=1.0)
    dout = _huge(1, 2, 16, 8, scale=1e37, seed=1)  # finite; times the softmax sums and sqrt(D) scales: inf
    offsets = torch.tensor([-1, 0, 1]).expand(1, 2, 3)
    where = "overflow float32 in the gradient of the"
    with pytest.raises(ValueError, match=rf"^dout, v and k {where} sparse attention: \|dout\|·\|v\|·\|k\|"):
        F.sparse_attention_vjp(v * 1e3, v * 1e3, v * 1e3, offsets, None, dout)
    with pytest.raises(ValueError, match=rf"^dout, v and k {where} attention"):
        F.attention_vjp(v * 1e3, v * 1e3, v * 1e3, torch.ones(2, 8), 3, dout)
    with pytest.raises(ValueError, match=rf"^b and dc {where} cross: \|b\|·\|dc\|"):
        F.cross_vjp(v * 1e10, v * 1e10, _huge(1, 2, 31, 8, scale=1e30, seed=2))
    with pytest.raises(ValueError, match=rf"^ds and w {where} estimate: \|ds\|·\|w\|"):
        F.estimate_vjp(_huge(1, 2, 31, 8, scale=1.0), torch.full((2, 8), 1e30), _huge(1, 2, 31, scale=1e30))


def test_overflow_checks_leave_autograd_and_the_values_alone():
    """A checked result that requires grad: no autograd warning from the check, the same numbers."""
    q, k, v = (_huge(1, 2, 16, 8, scale=1.0, seed=s, dtype=torch.float64).requires_grad_() for s in range(3))
    w = torch.ones(2, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = F.attention(q, k, v, w, 4)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, w))
    expected = ref.attention_vjp(*(N(x) for x in (q, k, v, w)), 4, 2 * N(out))
    for got, want in zip(grads, expected, strict=False):
        np.testing.assert_allclose(N(got), want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------ CUDA


def test_cuda_matches_reference():
    if not torch.cuda.is_available():
        print("skipping: torch.cuda.is_available() is False (no CUDA device on this machine)")
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    for dtype in ("float64", "float32"):  # pragma: no cover - needs CUDA
        for case in (ATTENTION_CASES[5], ATTENTION_CASES[7]):
            q, k, v, w, top_k, kw, dout = _attention_problem(case)
            tkw = torch_kw(kw, dtype, "cuda")
            leaves = [T(x, dtype, "cuda").requires_grad_() for x in (q, k, v, w)]
            if tkw.get("cross_q") is not None:
                tkw["cross_q"] = tkw["cross_q"].requires_grad_()
                tkw["cross_k"] = tkw["cross_k"].requires_grad_()
                leaves += [tkw["cross_q"], tkw["cross_k"]]
            out = F.attention(*leaves[:4], top_k, **tkw)
            assert out.device.type == "cuda"
            assert_close(out, ref.attention(q, k, v, w, top_k, **kw), FORWARD[dtype], "out")
            grads = torch.autograd.grad(out, leaves, T(dout, dtype, "cuda"))
            expected = ref.attention_vjp(q, k, v, w, top_k, dout, **kw)
            assert_grads(list(grads) + [None] * (6 - len(grads)), expected, GRADIENT[dtype])
            explicit = F.attention_vjp(*[x.detach() for x in leaves[:4]], top_k, T(dout, dtype, "cuda"),
                                       **{n: (x.detach() if isinstance(x, torch.Tensor) else x) for n,
                                          x in tkw.items()})
            assert_grads(explicit, expected, GRADIENT[dtype])


@pytest.mark.parametrize(("batch", "length", "itemsize", "sizes"), [
    (1, 16384, 4, [64]),  # 64 spectra of 16,385 complex64 entries: 8 MiB
    (1, 65536, 4, [22, 22, 20]),  # 31 rows per 16 MiB: three blocks, of equal size
    (1, 2**20, 4, [64]),  # one 8 MiB row per 16 MiB, fewer than 16: one block
    (16, 1024, 4, [64]),  # the forward's B = 16 at L = 1,024: 8.0 MiB
    (16, 1024, 8, [32, 32]),  # in float64: 16.0 MiB and 16 KiB
])
def test_feature_blocks_at_real_sizes(batch, length, itemsize, sizes):
    """The spectrum blocks of Dc = 64 features at the benchmark's shapes: within 16 MiB where blocks of at least
    16 features fit, of equal size; else one."""
    estimate_module = importlib.import_module("refattn.backends.torch.fsat.estimate")
    blocks = estimate_module.feature_blocks(batch, length, 64, itemsize)
    assert [block.stop - block.start for block in blocks] == sizes
    assert blocks[0].start == 0 and blocks[-1].stop == 64
    assert all(left.stop == right.start for left, right in zip(blocks, blocks[1:], strict=False))


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("kind", ["none", "random", "full-row"])
@pytest.mark.parametrize("lags", ["selected", "all"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 5, 5), (2, 2, 200, 4, 4)])
def test_estimate_of_cross_gradient_in_w(shape, lags, kind, blocks, monkeypatch):
    """s and dw of the spectrum path (``estimate_of_cross``, the cross never formed) against the reference's
    estimate and estimate_vjp of the formed cross: with ds nonzero at a few offsets per (batch, head), as
    ``attention``'s bias s[offsets] gives (the cross summed at those lags), and with ds dense (the
    spectra recomputed). Each case checks that the path it means ran. ``several``: the spectra in blocks
    of two features (the last one shorter for Dc = 5), as they go at long L."""
    estimate_module = importlib.import_module("refattn.backends.torch.fsat.estimate")
    batch, heads, length, features, _ = shape
    if blocks == "several":
        spectrum_row_bytes = batch * (estimate_module.fft_length(length) // 2 + 1) * 16  # complex128
        monkeypatch.setattr(estimate_module, "SPECTRUM_BYTES", 2 * spectrum_row_bytes + 1)
        monkeypatch.setattr(estimate_module, "MIN_BLOCK_FEATURES", 1)
        blocks = estimate_module.feature_blocks(batch, length, features, 8)
        assert [len(range(features)[block]) for block in blocks] == {5: [2, 2, 1], 4: [2, 2]}[features]
    rng = np.random.default_rng(sum(shape) + len(lags) + len(kind))
    mask = make_mask(rng, batch, length, kind)
    a, b = rng.standard_normal((2, batch, heads, length, features))
    w = rng.standard_normal((heads, features))
    ds = rng.standard_normal((batch, heads, 2 * length - 1))
    if lags == "selected":
        kept = np.zeros_like(ds, dtype=bool)
        for row in kept.reshape(-1, 2 * length - 1):
            row[rng.choice(2 * length - 1, size=6, replace=False)] = True
        ds = np.where(kept, ds, 0.0)
    ran = []
    for name in ("cross_at_lags", "spectrum_vjp"):
        original = getattr(estimate_module, name)
        monkeypatch.setattr(estimate_module, name,
                            lambda *args, _name=name, _original=original: ran.append(_name) or _original(*args))
    unpadded = None if mask is None else ~T(mask)
    tw = T(w).requires_grad_()
    s = estimate_module.estimate_of_cross(T(a), T(b), tw, unpadded)
    (dw,) = torch.autograd.grad(s, tw, torch.where(torch.isfinite(s), T(ds), torch.zeros(()).double()))
    assert ran == ["cross_at_lags" if lags == "selected" else "spectrum_vjp"]
    c = ref.cross(a, b, key_padding_mask=mask)
    assert_close(s.detach(), ref.estimate(c, w, key_padding_mask=mask), FORWARD["float64"], "s")
    _, expected = ref.estimate_vjp(c, w, ds, key_padding_mask=mask)
    assert_close(dw, expected, GRADIENT["float64"], "dw")
