"""The torch backend's ``routing`` namespace (backends/torch/routing/) against the NumPy reference.

Every function is compared with ``refattn.routing`` on float64 NumPy copies of the inputs (rounded to
the tested dtype first), with the tolerance table of spec/interface.md; discrete outputs (members,
assignments) must be equal. Autograd through ``attention`` is compared with the reference VJPs.
Also: exact tie rules, torch.compile vs eager, one test per bad input, lucidrains parity through the
torch backend, and a CUDA variant (skipped, with the reason, without a device).
"""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch", reason="the torch backend needs torch (pip install 'refattn[torch]')")

import torch

from refattn import get_backend
from refattn import routing as ref
from refattn.backends.torch import kernels
from refattn.backends.torch import routing as F
from refattn.backends.torch.routing.indexing import add_rows_into


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# spec/interface.md, "Tolerance policy": (rtol, atol)
FORWARD = {"float64": (1e-9, 1e-11), "float32": (1e-4, 1e-5), "bfloat16": (4e-2, 2e-2), "float16": (5e-3, 2e-3)}
GRADIENT = {"float64": (1e-8, 1e-10), "float32": (1e-3, 1e-4), "bfloat16": (8e-2, 4e-2), "float16": (2e-2, 5e-3)}
ACCUMULATION_TOL = {"float64": FORWARD["float64"], "float32": FORWARD["float32"]}


def T(x, dtype="float64", device="cpu"):
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.is_floating_point():
        t = t.to(DTYPES[dtype])
    return t.to(device)


def N(t):
    """A tensor as float64 (or int64) NumPy: the inputs as the backend holds them."""
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.double() if t.is_floating_point() else t.long()).numpy()


def route_module():
    """The module refattn.backends.torch.routing.route (the name F.route is the function)."""
    return importlib.import_module("refattn.backends.torch.routing.route")


def close(actual, expected, tol, what=""):
    rtol, atol = tol
    np.testing.assert_allclose(N(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def _margin(values, dtype):
    rtol, atol = FORWARD["float64" if dtype == "float64" else "float32"]
    return np.maximum(4 * (atol + rtol * np.abs(values)), 1e-4)


def _tie_free(s, window, mask, dtype):
    """Top-W per centroid and argmax per token decided by a margin (as the conformance suite asks)."""
    cols = np.moveaxis(s, 2, -1)
    if mask is not None:
        cols = np.where(mask[:, None, None, :], -np.inf, cols)
    ordered = -np.sort(-cols, axis=-1)
    if window < ordered.shape[-1]:
        a, b = ordered[..., window - 1], ordered[..., window]
        if not np.all(np.isneginf(b) | np.isneginf(a) | (a - b > _margin(np.where(np.isfinite(a), a, 0), dtype))):
            return False
    if s.shape[-1] > 1:
        best = -np.sort(-s, axis=-1)
        if not np.all(best[..., 0] - best[..., 1] > _margin(best[..., 0], dtype)):
            return False
    return True


def problem(shape, profile, causal, shared, padded, dtype="float64", seed=0):
    """Inputs rounded to ``dtype`` (as float64 NumPy), tie-free for that dtype."""
    batch, heads, length, dim, dim_v, clusters, window = shape
    for attempt in range(200):
        rng = np.random.default_rng([seed, attempt, length, dim, clusters, int(causal), int(shared), int(padded)])
        q, k = rng.standard_normal((2, batch, heads, length, dim))
        v = rng.standard_normal((batch, heads, length, dim_v))
        mu = rng.standard_normal((heads, clusters, dim))
        dout = rng.standard_normal((batch, heads, length, dim_v))
        mask = None
        if padded and length > 1:
            mask = np.zeros((batch, length), bool)
            mask[0, length - max(1, length // 3):] = True
            for b in range(1, batch):
                mask[b, rng.permutation(length)[: length // 3]] = True
        q, k, v, mu, dout = (N(T(x, dtype)) for x in (q, k, v, mu, dout))
        ok = all(_tie_free(np.einsum("bhld,hcd->bhlc", ref.normalize(x, profile=profile), mu), window, mask, dtype)
                 for x in ([q] if shared else [q, k]))
        if ok:
            return q, None if shared else k, v, mu, mask, dout
    raise RuntimeError("no tie-free seed")


# (B, H, L, D, Dv, C, W): L = 1, primes, a power of two; odd D; Dv != D; C W above and below L
SHAPES = [
    (2, 2, 1, 3, 3, 2, 1),
    (2, 2, 7, 5, 4, 3, 3),
    (2, 3, 13, 3, 5, 4, 4),
    (1, 2, 16, 8, 8, 4, 5),
    (2, 2, 11, 7, 6, 2, 4),  # C W < L: some tokens in no cluster
]
CONFIGS = [(p, c, s) for p, c, s in itertools.product(("tacl", "lucidrains"), (False, True), (False, True))
           if not (p == "lucidrains" and c and not s)]


# ------------------------------------------------------------------------------ attention and autograd


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}L{}D{}Dv{}C{}W{}".format(*s))
def test_attention_and_autograd_match_reference(shape, profile, causal, shared, padded, dtype):
    q, k, v, mu, mask, dout = problem(shape, profile, causal, shared, padded, dtype)
    kw = dict(window=shape[6], causal=causal, shared_qk=shared, profile=profile)
    leaves = [T(x, dtype).requires_grad_() for x in (q, v) + (() if shared else (k,))]
    tq, tv = leaves[:2]
    tk = None if shared else leaves[2]
    out = F.attention(tq, tk, tv, T(mu, dtype), key_padding_mask=T(mask), **kw)
    assert out.dtype == DTYPES[dtype] and out.shape == v.shape
    close(out, ref.attention(q, k, v, mu, key_padding_mask=mask, **kw), FORWARD[dtype], "out")
    grads = torch.autograd.grad(out, leaves, T(dout, dtype))
    dq, dk, dv = ref.attention_vjp(q, k, v, mu, dout, key_padding_mask=mask, **kw)
    close(grads[0], dq, GRADIENT[dtype], "dq")
    close(grads[1], dv, GRADIENT[dtype], "dv")
    if not shared:
        close(grads[2], dk, GRADIENT[dtype], "dk")
    # the explicit VJP gives the same
    vjp = F.attention_vjp(tq.detach(), None if shared else tk.detach(), tv.detach(), T(mu, dtype), T(dout, dtype),
                          key_padding_mask=T(mask), **kw)
    assert (vjp[1] is None) == shared
    for got, want in zip(vjp, (dq, dk, dv), strict=True):
        if want is not None:
            close(got, want, GRADIENT[dtype])
    if padded and mask is not None:
        assert float(out.detach()[torch.from_numpy(mask)[:, None].expand(-1, shape[1], -1)].abs().max()) == 0.0


@pytest.mark.parametrize("per", [1, 3, 10**6])  # clusters per chunk: one, a count that splits pairs, all
def test_unmasked_attention_in_chunks_of_clusters(per, monkeypatch):
    """Nothing masked: the fused attention and combination run on a CPU in chunks of clusters; any chunking
    gives the one-chunk results (each token's rows still added in slot order) and the reference's."""
    module = importlib.import_module("refattn.backends.torch.routing.cluster_attention")
    shape = (2, 3, 13, 5, 4, 4, 4)
    q, k, v, mu, _, dout = problem(shape, "tacl", False, False, False)
    kw = dict(window=4, profile="tacl")

    members = [ref.route(np.einsum("bhld,hcd->bhlc", ref.normalize(x), mu), 4) for x in (q, k)]
    do = np.random.default_rng(1).standard_normal(members[0].shape + (4,))

    def run():
        leaves = [T(x).requires_grad_() for x in (q, k, v)]
        out = F.attention(*leaves, T(mu), **kw)  # attention and combination in one
        o = F.cluster_attention(*leaves, *map(T, members), profile="tacl")  # the attention alone
        return (out, *torch.autograd.grad(out, leaves, T(dout)), o, *torch.autograd.grad(o, leaves, T(do)))

    whole = run()
    adds = []
    monkeypatch.setattr(module, "CHUNK_WEIGHTS", per * 4 * 4)
    monkeypatch.setattr(module, "add_rows_into", lambda *args: adds.append(1) or add_rows_into(*args))
    chunked = run()
    assert len(adds) == 7 * -(-2 * 3 * 4 // per)  # out, dv, dq, dk, then dv, dq, dk: once per chunk each
    for got, one_chunk in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, one_chunk, rtol=1e-14, atol=1e-15)
    expected = (ref.attention(q, k, v, mu, **kw), *ref.attention_vjp(q, k, v, mu, dout, **kw),
                ref.cluster_attention(q, k, v, *members, profile="tacl"),
                *ref.cluster_attention_vjp(q, k, v, *members, do, profile="tacl"))
    for index, (got, want) in enumerate(zip(chunked, expected, strict=True)):
        close(got, want, GRADIENT["float64"] if index % 4 else FORWARD["float64"], f"result {index}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("profile,causal,shared", [("tacl", True, False), ("lucidrains", False, True)])
def test_attention_reduced_precision(profile, causal, shared, dtype):
    shape = (2, 2, 13, 5, 4, 4, 4)
    q, k, v, mu, mask, dout = problem(shape, profile, causal, shared, True, dtype)
    kw = dict(window=4, causal=causal, shared_qk=shared, profile=profile)
    leaves = [T(x, dtype).requires_grad_() for x in (q, v) + (() if shared else (k,))]
    out = F.attention(leaves[0], None if shared else leaves[2], leaves[1], T(mu, dtype), key_padding_mask=T(mask), **kw)
    assert out.dtype == DTYPES[dtype]
    close(out, ref.attention(q, k, v, mu, key_padding_mask=mask, **kw), FORWARD[dtype])
    grads = torch.autograd.grad(out, leaves, T(dout, dtype))
    dq, dk, dv = ref.attention_vjp(q, k, v, mu, dout, key_padding_mask=mask, **kw)
    assert (dk is None) == shared
    for got, want in zip(grads, (dq, dv) if shared else (dq, dv, dk), strict=True):
        assert got.dtype == DTYPES[dtype]
        close(got, want, GRADIENT[dtype])


def test_backend_bridge_keeps_a_0d_array_0d():
    """A scalar cotangent (commitment_loss's) stays a scalar: np.ascontiguousarray would make it (1,)."""
    backend = get_backend("torch")
    scalar = backend.from_numpy(np.asarray(0.75), "float16", "cpu")
    assert scalar.shape == () and scalar.dtype == torch.float16 and float(scalar) == 0.75
    assert backend.from_numpy(np.arange(6.0).reshape(2, 3)[:, ::2], "float32", "cpu").is_contiguous()


def test_default_window_and_l1():
    q, k, v, mu, _, _ = problem((2, 2, 10, 4, 4, 3, 4), "tacl", False, False, False)
    np.testing.assert_allclose(N(F.attention(T(q), T(k), T(v), T(mu))), ref.attention(q, k, v, mu), rtol=1e-9,
                               atol=1e-11)
    assert F.default_num_clusters(10) == ref.default_num_clusters(10) == 3
    assert F.default_window(10, 3) == ref.default_window(10, 3) == 4
    # L = 1, lucidrains shared: the self logit is the only one -> v / (1 + 1e-5)
    v1 = np.arange(3.0).reshape(1, 1, 1, 3)
    out = F.attention(T(v1), None, T(v1), T(np.ones((1, 1, 3))), shared_qk=True, causal=True, profile="lucidrains")
    np.testing.assert_allclose(N(out), v1 / (1 + 1e-5), rtol=1e-12)


def test_attention_does_not_differentiate_through_centroids_and_leaves_inputs_alone():
    q, k, v, mu, mask, _ = problem((2, 2, 9, 4, 4, 3, 3), "tacl", False, False, True)
    tq, tk, tv, tmu = (T(x) for x in (q, k, v, mu))
    tmu.requires_grad_()
    copies = [x.clone() for x in (tq, tk, tv, tmu)]
    out = F.attention(tq, tk, tv, tmu, window=3, key_padding_mask=T(mask))
    assert not out.requires_grad  # no gradient path from the centroids (membership is discrete)
    for x, y in zip((tq, tk, tv, tmu), copies, strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ the steps


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
def test_normalize_and_vjp(profile, dtype):
    rng = np.random.default_rng(1)
    x = N(T(rng.standard_normal((2, 3, 7, 5)), dtype))
    x[0, 0, 0] = 0.0  # a zero row (lucidrains: the clamp is active)
    dy = N(T(rng.standard_normal(x.shape), dtype))
    out = F.normalize(T(x, dtype), profile=profile)
    assert out.dtype == DTYPES[dtype]
    close(out, ref.normalize(x, profile=profile), FORWARD[dtype])
    if dtype in ("float64", "float32") or profile == "tacl":  # the clamped row's dx = dy / 1e-12 overflows fp16
        close(F.normalize_vjp(T(x, dtype), T(dy, dtype), profile=profile),
              ref.normalize_vjp(x, dy, profile=profile), GRADIENT[dtype])
    # any rank >= 1, D = 1
    for shape in [(4,), (3, 1), (2, 2, 2, 1)]:
        y = rng.standard_normal(shape)
        close(F.normalize(T(y), profile=profile), ref.normalize(y, profile=profile), FORWARD["float64"])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_similarity_and_vjp(dtype):
    rng = np.random.default_rng(2)
    x, mu = N(T(rng.standard_normal((2, 3, 7, 5)), dtype)), N(T(rng.standard_normal((3, 4, 5)), dtype))
    ds = N(T(rng.standard_normal((2, 3, 7, 4)), dtype))
    close(F.similarity(T(x, dtype), T(mu, dtype)), ref.similarity(x, mu), FORWARD[dtype])
    got = F.similarity_vjp(T(x, dtype), T(mu, dtype), T(ds, dtype))
    for a, b in zip(got, ref.similarity_vjp(x, mu, ds), strict=True):
        close(a, b, GRADIENT[dtype])
    # and autograd through similarity agrees with the explicit VJP
    tx, tmu = T(x).requires_grad_(), T(mu).requires_grad_()
    auto = torch.autograd.grad(F.similarity(tx, tmu), (tx, tmu), T(ds))
    for a, b in zip(auto, ref.similarity_vjp(x, mu, ds), strict=True):
        close(a, b, GRADIENT["float64"])


def test_route_tie_rule_and_padding():
    # all equal: every centroid takes positions 0 .. W-1
    s = np.zeros((1, 2, 6, 3))
    assert N(F.route(T(s), 4)).tolist() == ref.route(s, 4).tolist() == [[[[0, 1, 2, 3]] * 3] * 2]
    # integer-valued similarities with many ties, vs the reference exactly
    rng = np.random.default_rng(3)
    for length, window in [(1, 1), (7, 3), (16, 16), (13, 5), (29, 8)]:
        s = rng.integers(-2, 3, size=(3, 2, length, 4)).astype(np.float64)
        mask = rng.random((3, length)) < 0.4
        mask[0] = False
        mask[1] = True  # all padded: every slot -1
        for m in (None, mask):
            got = F.route(T(s), window, key_padding_mask=T(m))
            assert got.dtype == torch.int64 and got.shape == (3, 2, 4, window)
            np.testing.assert_array_equal(N(got), ref.route(s, window, key_padding_mask=m))
    # fewer than W unpadded tokens: all of them in order, -1 at the end
    s = rng.standard_normal((1, 1, 5, 2))
    mask = np.array([[True, False, True, False, True]])
    np.testing.assert_array_equal(N(F.route(T(s), 3, key_padding_mask=T(mask))), [[[[1, 3, -1], [1, 3, -1]]]])


def test_route_fast_path_and_tie_rule_agree():
    """Tie-free rows take the top-W shortcut; one tie at the boundary of one row sends the call to the
    exact tie rule. Both must give the reference's members, and a tie inside the top W (not at its
    boundary) keeps the shortcut."""
    rng = np.random.default_rng(5)
    s = rng.standard_normal((2, 2, 11, 3))
    np.testing.assert_array_equal(N(F.route(T(s), 4)), ref.route(s, 4))
    order = np.argsort(-s[1, 0, :, 2], kind="stable")
    boundary = s.copy()
    boundary[1, 0, order[4], 2] = boundary[1, 0, order[3], 2]  # the 4th and 5th largest tie
    np.testing.assert_array_equal(N(F.route(T(boundary), 4)), ref.route(boundary, 4))
    inside = s.copy()
    inside[1, 0, order[1], 2] = inside[1, 0, order[0], 2]  # the two largest tie, both taken
    np.testing.assert_array_equal(N(F.route(T(inside), 4)), ref.route(inside, 4))


@pytest.mark.parametrize("length,window,size", [(11, 4, 1), (16, 4, 2), (64, 4, 4), (4096, 64, 8), (96, 3, 4)])
def test_group_size(length, window, size):
    assert route_module().group_size(length, window) == size


@settings(max_examples=80, deadline=None)
@given(log_length=st.integers(0, 9), window_exponent=st.floats(0.0, 1.0), levels=st.integers(0, 6),
       seed=st.integers(0, 2**32 - 1))
def test_top_window_by_groups(log_length, window_exponent, levels, seed):
    """The selection over groups against one ``torch.topk`` over the row, on rows of few distinct values
    (ties at the threshold, inside the kept groups and outside; ``levels`` 0: continuous) and padded
    tokens: the same threshold, "unique" exactly when a row has W scores >= it, then the same positions;
    and routes as the reference."""
    length = 2**log_length * (3 if seed % 2 else 1)  # powers of two take the grouped path, some thirds too
    window = max(1, int(length**window_exponent))  # small windows (the grouped path) as often as large
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels, size=(3, length)) if levels else rng.standard_normal((3, length)))
    scores = scores.astype(np.float32)
    size = route_module().group_size(length, window)
    if size > 1:
        s = torch.tensor(scores)
        s[1, torch.from_numpy(rng.random(length) < 0.5)] = float("-inf")  # padded tokens, as route_rows masks them
        positions, threshold, unique = route_module().top_window_by_groups(s, window, size)
        top = torch.topk(s, window, dim=-1)
        assert torch.equal(threshold, top.values[:, -1:])
        assert bool(unique) == bool(torch.count_nonzero(s >= threshold) == 3 * window)
        if unique:
            assert torch.equal(positions.sort().values, top.indices.sort().values)
        event(f"grouped path, unique {bool(unique)}")
    similarities = scores.T[None, None].astype(np.float64)  # (B, H, L, C) = (1, 1, L, 3)
    for mask in (None, rng.random((1, length)) < 0.3):
        np.testing.assert_array_equal(N(F.route(T(similarities), window, key_padding_mask=T(mask))),
                                      ref.route(similarities, window, key_padding_mask=mask))


@settings(max_examples=120, deadline=None)
@given(length=st.integers(1, 700), window_exponent=st.floats(0.0, 1.0), levels=st.integers(0, 5),
       padding=st.sampled_from([0.0, 0.2, 0.9]), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**32 - 1))
def test_route_kernel_against_the_reference(length, window_exponent, levels, padding, dtype, seed):
    """routing_route.cpp (the CPU's route) against the reference's partition rule: rows of few distinct values
    (``levels`` 0: continuous), so ties at the threshold, inside the top W and among the block maxima;
    signed zeros, which are equal; padded tokens, also whole rows and fewer than W unpadded; lengths that
    the 4W groups do not divide; any W in [1, L]."""
    window = max(1, int(length**window_exponent))
    rng = np.random.default_rng(seed)
    shape = (2, 2, length, 3)  # (B, H, L, C)
    s = rng.integers(-levels, levels + 1, size=shape) * 0.5 if levels else rng.standard_normal(shape)
    s = np.where(s == 0, rng.choice([0.0, -0.0], size=shape), s).astype(dtype)
    mask = rng.random((2, length)) < padding if padding else None
    if mask is not None:
        mask[1, : rng.integers(0, length + 1)] = True
    members = kernels.route_rows(T(s, dtype).transpose(-1, -2), window, T(mask))
    event(f"levels {min(levels, 1)}, W {'= L' if window == length else '< L'}, padding {padding}")
    np.testing.assert_array_equal(N(members), ref.route(s.astype(np.float64), window, key_padding_mask=mask))


def test_route_kernel_leaves_rows_with_nan_to_torch():
    """A NaN at an unpadded position (which the public functions reject before routing): the kernel
    reports it and routing takes torch's path; NaN at padded positions is ignored."""
    s = torch.arange(24, dtype=torch.float64).reshape(1, 1, 2, 12)
    nan_row = s.clone()
    nan_row[0, 0, 1, 5] = float("nan")
    assert kernels.route_rows(nan_row, 3, None) is None
    padded = torch.zeros(1, 12, dtype=torch.bool)
    padded[0, 5] = True
    assert kernels.route_rows(nan_row, 3, padded).tolist() == [[[[9, 10, 11], [9, 10, 11]]]]


@pytest.mark.parametrize("threads", [1, 2])
def test_route_kernel_results_do_not_depend_on_threads(threads):
    rng = np.random.default_rng(8)
    s = T(rng.integers(0, 3, size=(2, 4, 64, 257)).astype(np.float32), "float32")
    torch.set_num_threads(threads)
    np.testing.assert_array_equal(N(kernels.route_rows(s, 40, None)), ref.route(N(s).swapaxes(-1, -2), 40))


def test_routing_without_a_compiler_takes_torch_operations(monkeypatch, tmp_path):
    """No g++ (and no build in the cache): routing's CPU calls take torch's top-k and index_add_ with the
    same results, and forcing the kernels says why they cannot run."""
    q, k, v, mu, _, dout = problem((1, 2, 24, 4, 4, 3, 6), "lucidrains", False, False, False, "float64")
    leaves = [T(x).requires_grad_() for x in (q, k, v)]

    def run() -> list:
        out = F.attention(*leaves, T(mu), window=6, profile="lucidrains")
        return [out, *torch.autograd.grad(out, leaves, T(dout))]

    with_kernels = run()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("REFATTN_CACHE_DIR", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert "needs g++" in kernels.unavailable()
        for got, expected in zip(run(), with_kernels, strict=True):
            assert torch.equal(got, expected)
        with kernels.forced(True), pytest.raises(RuntimeError, match="the CPU kernels were required but cannot "
                                                                      "run: .*needs g.. "):
            run()
    finally:
        kernels._library.cache_clear()


def test_route_chunks_equal_one_pass(monkeypatch):
    rng = np.random.default_rng(4)
    s = rng.integers(-3, 4, size=(2, 2, 17, 9)).astype(np.float64)
    mask = rng.random((2, 17)) < 0.3
    whole = F.route(T(s), 5, key_padding_mask=T(mask))
    monkeypatch.setattr(route_module(), "CHUNK_ELEMENTS", 2 * 2 * 17 * 2)  # chunks of 2 centroids
    assert torch.equal(F.route(T(s), 5, key_padding_mask=T(mask)), whole)
    np.testing.assert_array_equal(N(whole), ref.route(s, 5, key_padding_mask=mask))


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_scatter_adds_each_row_in_order(threads, use_kernels):
    """The scatters of the gradients and of the combination add each token's rows in slot order, as the
    reference's loop does: bitwise, with terms whose float32 sum depends on the order, with one or two
    threads (on a CPU, ``index_add_`` sorts the rows, and the sort must be stable; the kernel splits the
    token rows between the threads, and a row at the seam must be added once)."""
    indexing = importlib.import_module("refattn.backends.torch.routing.indexing")
    rng = np.random.default_rng(5)
    for total, count in ((37, 5000), (4099, 30000)):  # 4,099 rows: two threads' ranges in the kernel
        rows = rng.integers(0, total, size=count)
        values = rng.choice([1e8, 1.0, -1e8, 3.0, 0.5], size=(count, 3)).astype(np.float32)
        expected = np.zeros((total, 3), np.float32)
        np.add.at(expected, rows, values)  # unbuffered: in the order of the values, in float32
        torch.set_num_threads(threads)
        with kernels.forced(use_kernels):
            got = indexing.add_rows(total, torch.from_numpy(rows), torch.from_numpy(values))
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_route_and_assign_random(dtype):
    for padded in (False, True):
        q, k, v, mu, mask, _ = problem((2, 3, 13, 5, 5, 4, 4), "tacl", False, False, padded, dtype)
        x_hat = ref.normalize(q)
        s = np.einsum("bhld,hcd->bhlc", x_hat, mu)
        np.testing.assert_array_equal(
            N(F.route(F.similarity(F.normalize(T(q, dtype)), T(mu, dtype)), 4, key_padding_mask=T(mask))),
            ref.route(s, 4, key_padding_mask=mask))
        np.testing.assert_array_equal(N(F.assign(T(x_hat), T(mu), key_padding_mask=T(mask))),
                                      ref.assign(x_hat, mu, key_padding_mask=mask))


def test_assign_ties_to_lower_index():
    x = np.ones((1, 1, 2, 2))
    mu = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    mask = np.array([[False, True]])
    assert N(F.assign(T(x), T(mu), key_padding_mask=T(mask))).tolist() == [[[0, -1]]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("profile,causal,shared", CONFIGS)
def test_cluster_attention_combine_and_vjps(profile, causal, shared, dtype):
    shape = (2, 2, 11, 5, 3, 4, 4)
    q, k, v, mu, mask, dout = problem(shape, profile, causal, shared, True, dtype)
    qm = ref.route(np.einsum("bhld,hcd->bhlc", ref.normalize(q, profile=profile), mu), 4, key_padding_mask=mask)
    km = qm if shared else ref.route(np.einsum("bhld,hcd->bhlc", ref.normalize(k, profile=profile), mu), 3,
                                     key_padding_mask=mask)
    kw = dict(causal=causal, shared_qk=shared, profile=profile)
    o = F.cluster_attention(T(q, dtype), T(k, dtype), T(v, dtype), T(qm), T(km), **kw)
    o_ref = ref.cluster_attention(q, k, v, qm, km, **kw)
    close(o, o_ref, FORWARD[dtype])
    close(F.combine(T(o_ref, dtype), T(qm), 11, profile=profile), ref.combine(o_ref, qm, 11, profile=profile),
          FORWARD[dtype])
    do = ref.combine_vjp(qm, dout, profile=profile)
    close(F.combine_vjp(T(qm), T(dout, dtype), profile=profile), do, GRADIENT[dtype])
    got = F.cluster_attention_vjp(T(q, dtype), T(k, dtype), T(v, dtype), T(qm), T(km), T(do, dtype), **kw)
    want = ref.cluster_attention_vjp(q, k, v, qm, km, do, **kw)
    assert (got[1] is None) == shared
    for a, b in zip(got, want, strict=True):
        if b is not None:
            close(a, b, GRADIENT[dtype])


def test_cluster_attention_edge_cases():
    # empty slots and a row with no valid key (causal, unshared: every key after the query) give 0
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 1, 1, 6, 3))
    qm = np.array([[[[0, 2, -1], [1, 4, 5]]]])
    km = np.array([[[[3, 4, -1], [0, -1, -1]]]])
    got = F.cluster_attention(T(q), T(k), T(v), T(qm), T(km), causal=True)
    want = ref.cluster_attention(q, k, v, qm, km, causal=True)
    np.testing.assert_allclose(N(got), want, rtol=1e-12, atol=1e-14)
    assert np.all(N(got)[0, 0, 0] == 0.0)  # positions 0 and 2 see no key <= them; slot 2 empty
    dq, dk, dv = F.cluster_attention_vjp(T(q), T(k), T(v), T(qm), T(km), T(np.ones(want.shape)), causal=True)
    for a, b in zip((dq, dk, dv), ref.cluster_attention_vjp(q, k, v, qm, km, np.ones(want.shape), causal=True),
                    strict=True):
        np.testing.assert_allclose(N(a), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("length,block", [(1, 3), (7, 3), (13, 4), (8, 8), (5, 9), (6, 1)])
def test_local_attention_and_vjp(length, block, causal, padded, dtype):
    rng = np.random.default_rng([length, block, int(causal), int(padded)])
    q, k = (N(T(x, dtype)) for x in rng.standard_normal((2, 2, 2, length, 5)))
    v, dout = (N(T(x, dtype)) for x in rng.standard_normal((2, 2, 2, length, 3)))
    mask = None
    if padded and length > 1:
        mask = rng.random((2, length)) < 0.3
    kw = dict(causal=causal, key_padding_mask=mask)
    tkw = dict(causal=causal, key_padding_mask=T(mask))
    close(F.local_attention(T(q, dtype), T(k, dtype), T(v, dtype), block, **tkw),
          ref.local_attention(q, k, v, block, **kw), FORWARD[dtype])
    got = F.local_attention_vjp(T(q, dtype), T(k, dtype), T(v, dtype), block, T(dout, dtype), **tkw)
    for a, b in zip(got, ref.local_attention_vjp(q, k, v, block, dout, **kw), strict=True):
        close(a, b, GRADIENT[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("padded", [False, True])
def test_commitment_loss_and_vjp(padded, dtype):
    q, _, _, mu, mask, _ = problem((2, 3, 9, 4, 4, 3, 3), "tacl", False, True, padded, dtype)
    x_hat = N(T(ref.normalize(q), dtype))
    loss = F.commitment_loss(T(x_hat, dtype), T(mu, dtype), key_padding_mask=T(mask))
    assert loss.dim() == 0 and loss.dtype == (torch.float32 if dtype in ("bfloat16", "float16") else DTYPES[dtype])
    close(loss, ref.commitment_loss(x_hat, mu, key_padding_mask=mask), FORWARD[dtype])
    dx = ref.commitment_loss_vjp(x_hat, mu, 2.5, key_padding_mask=mask)
    close(F.commitment_loss_vjp(T(x_hat, dtype), T(mu, dtype), 2.5, key_padding_mask=T(mask)), dx, GRADIENT[dtype])
    tx = T(x_hat).requires_grad_()
    (auto,) = torch.autograd.grad(F.commitment_loss(tx, T(mu), beta=1e-4, key_padding_mask=T(mask)) * 2.5, tx)
    close(auto, dx, GRADIENT["float64"])
    # every token padded: 0, gradient 0
    everything = np.ones((2, 9), bool)
    assert float(F.commitment_loss(T(x_hat), T(mu), key_padding_mask=T(everything))) == 0.0
    assert float(F.commitment_loss_vjp(T(x_hat), T(mu), key_padding_mask=T(everything)).abs().max()) == 0.0


def test_init_centroids():
    for profile in ("tacl", "lucidrains"):
        a = F.init_centroids(2, 5, 4, rng=np.random.default_rng(7), profile=profile, dtype=torch.float64)
        b = ref.init_centroids(2, 5, 4, rng=np.random.default_rng(7), profile=profile)
        assert isinstance(a, ref.CentroidState)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(N(x), y, rtol=1e-14, atol=1e-15)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        c1 = F.init_centroids(2, 5, 4, rng=g1, profile=profile)
        c2 = F.init_centroids(2, 5, 4, rng=g2, profile=profile)
        assert all(torch.equal(x, y) for x, y in zip(c1, c2, strict=True))
        assert c1.means.dtype == torch.get_default_dtype() and c1.counts.shape == (2, 5)
        assert torch.equal(c1.counts, torch.zeros(2, 5)) and torch.equal(c1.sums, c1.means)
        if profile == "lucidrains":
            torch.testing.assert_close(c1.means.norm(dim=-1), torch.ones(2, 5))
        else:
            torch.testing.assert_close(c1.means.mean(dim=-1), torch.zeros(2, 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_update_centroids(profile, shared, padded, dtype):
    q, k, _, mu, mask, _ = problem((3, 2, 9, 4, 4, 5, 3), profile, False, shared, padded, dtype)
    rng = np.random.default_rng(8)
    counts = N(T(rng.uniform(0.5, 2.0, (2, 5)), dtype))
    sums = N(T(rng.standard_normal((2, 5, 4)), dtype))
    q_hat, k_hat = ref.normalize(q, profile=profile), None if shared else ref.normalize(k, profile=profile)
    q_hat, k_hat = N(T(q_hat, dtype)), N(T(k_hat, dtype))
    state = F.CentroidState(T(mu, dtype), T(counts, dtype), T(sums, dtype))
    before = [x.clone() for x in state]
    new = F.update_centroids(state, T(q_hat, dtype), T(k_hat, dtype), profile=profile, key_padding_mask=T(mask),
                             decay=0.9)
    want = ref.update_centroids(ref.CentroidState(mu, counts, sums), q_hat, k_hat, profile=profile,
                                key_padding_mask=mask, decay=0.9)
    assert isinstance(new, ref.CentroidState)
    for a, b in zip(new, want, strict=True):
        assert a.dtype == DTYPES[dtype]
        close(a, b, FORWARD[dtype])
    assert all(torch.equal(x, y) for x, y in zip(state, before, strict=True))  # functional


def test_statistics_split_and_sum_equals_whole_batch():
    """Sufficient statistics summed over two halves of a batch = the whole batch's update (DDP's rule)."""
    for profile in ("tacl", "lucidrains"):
        q, k, _, mu, mask, _ = problem((4, 2, 9, 4, 4, 5, 3), profile, False, False, True)
        q_hat, k_hat = (T(ref.normalize(x, profile=profile)) for x in (q, k))
        state = F.init_centroids(2, 5, 4, rng=np.random.default_rng(1), profile=profile, dtype=torch.float64)
        state = F.CentroidState(T(mu), state.counts + 1.0, state.sums)
        whole = F.update_centroids(state, q_hat, k_hat, profile=profile, key_padding_mask=T(mask))
        halves = [F.centroid_statistics(state, q_hat[s], k_hat[s], key_padding_mask=T(mask)[s])
                  for s in (slice(0, 2), slice(2, 4))]
        summed = tuple((a[0] + b[0], a[1] + b[1]) for a, b in zip(*halves, strict=True))
        split = F.apply_centroid_statistics(state, summed, profile=profile)
        for a, b in zip(split, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_update_keeps_means_when_nothing_counted():
    state = F.init_centroids(1, 3, 4, rng=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    new = F.update_centroids(state, x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(new.means, state.means)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("profile,causal,shared", [
    ("tacl", True, False),
    pytest.param("lucidrains", False, True, marks=pytest.mark.slow),  # a second cold compile, ~30 s
])
def test_torch_compile_matches_eager(profile, causal, shared, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    q, k, v, mu, mask, dout = problem((2, 2, 13, 5, 4, 4, 4), profile, causal, shared, True)
    kw = dict(window=4, causal=causal, shared_qk=shared, profile=profile, key_padding_mask=T(mask))

    def f(q, k, v, mu):
        return F.attention(q, k, v, mu, **kw)

    def run(fn):
        leaves = [T(x).requires_grad_() for x in (q, v) + (() if shared else (k,))]
        out = fn(leaves[0], None if shared else leaves[2], leaves[1], T(mu))
        return [out.detach()] + list(torch.autograd.grad(out, leaves, T(dout)))

    eager = run(f)
    explanation = torch._dynamo.explain(f)(T(q), None if shared else T(k), T(v), T(mu))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = run(torch.compile(f, backend="inductor"))
    for x, y in zip(compiled, eager, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    close(eager[0], ref.attention(q, k, v, mu, window=4, causal=causal, shared_qk=shared, profile=profile,
                                  key_padding_mask=mask), FORWARD["float64"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ bad inputs


def _good():
    rng = np.random.default_rng(0)
    q, k, v = (T(x) for x in rng.standard_normal((3, 2, 2, 6, 3)))
    return q, k, v, T(rng.standard_normal((2, 3, 3)))


def test_rejects_numpy_arrays():
    q, k, v, mu = _good()
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        F.attention(q.numpy(), k, v, mu)


def test_rejects_integer_q():
    q, k, v, mu = _good()
    with pytest.raises(TypeError, match="q: expected a real floating-point tensor"):
        F.attention(q.long(), k, v, mu)


def test_rejects_mixed_dtypes():
    q, k, v, mu = _good()
    with pytest.raises(TypeError, match="expected one floating-point dtype"):
        F.attention(q, k, v.float(), mu)


def test_rejects_wrong_rank():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        F.attention(q[0], k, v, mu)


def test_rejects_mismatched_shapes():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="k: expected shape"):
        F.attention(q, k[:, :, :5], v, mu)
    with pytest.raises(ValueError, match="v: expected shape"):
        F.attention(q, k, v[:1], mu)


def test_rejects_empty_axis():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="at least 1"):
        F.attention(q[:, :, :, :0], k[:, :, :, :0], v, mu[:, :, :0])


def test_rejects_nan():
    q, k, v, mu = _good()
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q: expected finite values"):
        F.attention(q, k, v, mu)


def test_rejects_inf_centroids():
    q, k, v, mu = _good()
    mu[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="centroids: expected finite values"):
        F.attention(q, k, v, mu)


def test_rejects_wrong_centroid_shape():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="centroids: expected shape"):
        F.attention(q, k, v, mu[:1])
    with pytest.raises(ValueError, match="centroids: expected a 3-D tensor"):
        F.attention(q, k, v, mu[0])


@pytest.mark.parametrize("window", [0, 7, -1])
def test_rejects_window_out_of_range(window):
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="window: expected an integer in"):
        F.attention(q, k, v, mu, window=window)


def test_rejects_non_integer_window():
    q, k, v, mu = _good()
    with pytest.raises(TypeError, match="window: expected an integer"):
        F.attention(q, k, v, mu, window=2.0)


def test_rejects_unknown_profile():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="profile: expected one of"):
        F.attention(q, k, v, mu, profile="reformer")


def test_rejects_lucidrains_causal_unshared():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="profile: 'lucidrains' does not support causal=True"):
        F.attention(q, k, v, mu, causal=True, profile="lucidrains")


def test_rejects_k_with_shared_qk():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="k: expected None with shared_qk=True"):
        F.attention(q, k, v, mu, shared_qk=True)


def test_rejects_missing_k_without_shared_qk():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="k: expected a"):
        F.attention(q, None, v, mu)


def test_rejects_non_bool_mask():
    q, k, v, mu = _good()
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
        F.attention(q, k, v, mu, key_padding_mask=torch.zeros(2, 6))


def test_rejects_mask_shape():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        F.attention(q, k, v, mu, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_rejects_mixed_devices():
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="expected all tensors on one device"):
        F.attention(q, k, v, mu.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: cpu vs cuda mismatch not testable")
def test_rejects_cpu_and_cuda_mix():  # pragma: no cover - needs CUDA
    q, k, v, mu = _good()
    with pytest.raises(ValueError, match="expected all tensors on one device"):
        F.attention(q, k, v, mu.cuda())


def test_rejects_members_out_of_range():
    q, k, v, _ = _good()
    bad = torch.zeros(2, 2, 3, 2, dtype=torch.int64)
    bad[0, 0, 0, 0] = 6
    with pytest.raises(ValueError, match="q_members: expected positions in"):
        F.cluster_attention(q, k, v, bad, bad.clamp(max=5))


def test_rejects_repeated_members():
    q, k, v, _ = _good()
    members = torch.tensor([0, 1]).expand(2, 2, 3, 2).clone()
    members[1, 1, 2] = torch.tensor([4, 4])
    with pytest.raises(ValueError, match="k_members: expected distinct positions"):
        F.cluster_attention(q, k, v, members.clone().fill_(0)[..., :1], members)


def test_rejects_float_members():
    q, k, v, _ = _good()
    with pytest.raises(TypeError, match="q_members: expected an integer tensor"):
        F.cluster_attention(q, k, v, torch.zeros(2, 2, 3, 2), torch.zeros(2, 2, 3, 2, dtype=torch.int64))


def test_rejects_cluster_count_mismatch():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="k_members: expected the same number of clusters"):
        F.cluster_attention(q, k, v, torch.zeros(2, 2, 3, 1, dtype=torch.int64),
                            torch.zeros(2, 2, 2, 1, dtype=torch.int64))


def test_rejects_combine_shape_mismatch():
    with pytest.raises(ValueError, match="q_members: expected shape"):
        F.combine(torch.zeros(1, 1, 2, 3, 4), torch.tensor([0, 1]).expand(1, 1, 2, 2), 5)


def test_rejects_combine_length():
    with pytest.raises(ValueError, match="length: expected an integer"):
        F.combine(torch.zeros(1, 1, 2, 3, 4), torch.tensor([0, 1, 2]).expand(1, 1, 2, 3), 0)


def test_rejects_block_below_one():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="block: expected an integer"):
        F.local_attention(q, k, v, 0)


def test_rejects_normalize_scalar():
    with pytest.raises(ValueError, match="x: expected a tensor whose last axis"):
        F.normalize(torch.tensor(1.0))


def test_rejects_decay_out_of_range():
    q, _, _, mu = _good()
    state = F.CentroidState(mu, torch.zeros(2, 3, dtype=torch.float64), mu.clone())
    with pytest.raises(ValueError, match="decay: expected a number in"):
        F.update_centroids(state, q, decay=1.5)


def test_rejects_bad_state():
    q, _, _, mu = _good()
    with pytest.raises(TypeError, match="state: expected a CentroidState"):
        F.update_centroids(mu, q)
    with pytest.raises(ValueError, match="state.counts: expected shape"):
        F.update_centroids(F.CentroidState(mu, torch.zeros(2, 4, dtype=torch.float64), mu), q)


def test_rejects_state_input_mismatch():
    q, _, _, mu = _good()
    state = F.CentroidState(mu[:, :, :2], torch.zeros(2, 3, dtype=torch.float64), mu[:, :, :2])
    with pytest.raises(ValueError, match="q_hat: expected shape"):
        F.update_centroids(state, q)


def test_rejects_bad_rng():
    with pytest.raises(TypeError, match="rng: expected a torch.Generator"):
        F.init_centroids(1, 2, 3, rng=0)


def test_rejects_infinite_beta():
    q, _, _, mu = _good()
    with pytest.raises(ValueError, match="beta: expected a finite number"):
        F.commitment_loss(q, mu, beta=float("inf"))


def test_rejects_bad_statistics():
    _, _, _, mu = _good()
    state = F.CentroidState(mu, torch.zeros(2, 3, dtype=torch.float64), mu)
    with pytest.raises(TypeError, match=r"statistics\[0\]: expected a \(counts, sums\) pair"):
        F.apply_centroid_statistics(state, [mu])
    with pytest.raises(ValueError, match=r"statistics\[0\].sums: expected shape"):
        F.apply_centroid_statistics(state, [(torch.zeros(2, 3, dtype=torch.float64), mu[:1])])


# ------------------------------------------------------------------------------ overflow


def _big(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(scale).float()


def _centroids():
    return F.init_centroids(2, 3, 8, rng=np.random.default_rng(0), dtype=torch.float32).means


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflow_of_the_cluster_logits_names_q_and_k(dtype):
    """lucidrains' logits are raw q·k / sqrt(D): |q|·|k| of 1e40 overflows float32 (bfloat16 is
    computed in float32); before, the output was NaN."""
    q, v = _big(1, 2, 16, 8, scale=1e20).to(dtype), _big(1, 2, 16, 8, seed=1).to(dtype)
    mu = _centroids()
    message = r"^q and k overflow float32 in the cluster attention: \|q\|·\|k\| up to \d\.\de\+4\d$"
    with pytest.raises(ValueError, match=message):
        F.attention(q, q, v, mu, profile="lucidrains")
    members = F.route(F.similarity(F.normalize(v.float()), mu), 6)
    with pytest.raises(ValueError, match=message):
        F.cluster_attention(q, q, v, members, members, profile="lucidrains")
    with pytest.raises(ValueError, match=r"^q and k overflow float32 in the local attention: \|q\|·\|k\|"):
        F.local_attention(q, q, v, 4)


def test_overflow_of_the_similarities_names_the_centroids():
    """Normalized tokens (|x̂| about sqrt(D)) against centroids of 1e38: the similarities overflow."""
    v = _big(1, 2, 16, 8)
    mu = _centroids() * 1e38
    with pytest.raises(ValueError, match=r"^centroids overflows float32 in the similarity of the normalized q "
                                         r"to the centroids: \|centroids\| up to"):
        F.attention(v, v, v, mu)
    with pytest.raises(ValueError, match=r"^x_hat and centroids overflow float32 in the similarity"):
        F.similarity(F.normalize(v), mu)


def test_overflow_of_the_normalization_names_x():
    with pytest.raises(ValueError, match=r"^x overflows float32 in the normalization: \|x\| up to \d\.\de\+20$"):
        F.normalize(_big(1, 2, 16, 8, scale=1e20))


def test_overflow_of_the_gradients_names_the_cotangent():
    v, mu = _big(1, 2, 16, 8), _centroids()
    dout = _big(1, 2, 16, 8, scale=1e36, seed=1)
    where = "overflow float32 in the gradient of the"
    with pytest.raises(ValueError, match=rf"^dout, v, q and k {where} routing attention"):
        F.attention_vjp(v * 1e3, v * 1e3, v * 1e3, mu, dout * 10)
    with pytest.raises(ValueError, match=rf"^dout, v and k {where} local attention"):
        F.local_attention_vjp(v * 1e3, v * 1e3, v * 1e3, 4, dout * 10)
    members = F.route(F.similarity(F.normalize(v), mu), 6)
    with pytest.raises(ValueError, match=rf"^do, v, q and k {where} cluster attention"):
        F.cluster_attention_vjp(v * 1e3, v * 1e3, v * 1e3, members, members, _big(1, 2, 3, 6, 8, scale=1e37))
    with pytest.raises(ValueError, match=rf"^ds and centroids {where} similarity"):
        F.similarity_vjp(F.normalize(v), mu * 1e30, _big(1, 2, 16, 3, scale=1e30))


# ------------------------------------------------------------------------------ lucidrains parity


try:
    import routing_transformer as rt
except ImportError:  # pragma: no cover - the 'peer' extra is not installed
    rt = None
needs_rt = pytest.mark.skipif(rt is None, reason="routing_transformer 1.6.1 is not installed (extra 'peer')")

PARITY_CASES = [  # (causal, shared_qk, B, H, L, D, C, W)
    (False, False, 2, 3, 16, 8, 4, 4),
    (False, False, 1, 2, 13, 5, 3, 6),
    (False, False, 2, 1, 20, 7, 5, 3),  # C W < L: some tokens in no cluster
    (False, True, 2, 3, 16, 8, 4, 4),
    (False, True, 1, 2, 11, 3, 4, 5),
    (True, True, 2, 3, 16, 8, 4, 4),
    (True, True, 2, 2, 17, 6, 3, 8),
    (True, True, 1, 1, 1, 4, 2, 1),  # L = 1
]


def _kmeans_attention(causal, shared, heads, dim, centroids, window, dtype):
    attn = rt.KmeansAttention(centroids.shape[1], window, heads, dim, causal=causal, shared_qk=shared, dropout=0.0)
    attn = attn.to(DTYPES[dtype]).eval()
    assert attn.num_mem_kv == 0
    with torch.no_grad():
        attn.kmeans.means.copy_(T(centroids, dtype))
        attn.kmeans.initted.fill_(True)
    return attn


@needs_rt
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal,shared,batch,heads,length,dim,clusters,window", PARITY_CASES)
def test_lucidrains_parity(causal, shared, batch, heads, length, dim, clusters, window, dtype):
    rng = np.random.default_rng(length * 13 + dim)
    q, k, v, dout = (N(T(x, dtype)) for x in rng.standard_normal((4, batch, heads, length, dim)))
    mu = rng.standard_normal((heads, clusters, dim))
    mu = N(T(mu / np.linalg.norm(mu, axis=-1, keepdims=True), dtype))
    tol = (1e-10, 1e-10) if dtype == "float64" else FORWARD[dtype]
    gtol = (1e-10, 1e-10) if dtype == "float64" else GRADIENT[dtype]
    if dtype == "float32":  # float32 routing may only be compared where it is tie-free
        for x in [q] if shared else [q, k]:
            assert _tie_free(np.einsum("bhld,hcd->bhlc", ref.normalize(x, profile="lucidrains"), mu),
                             min(window, length), None, "float32")
    attn = _kmeans_attention(causal, shared, heads, dim, mu, window, dtype)
    lq, lk, lv = (T(x, dtype).requires_grad_() for x in (q, k, v))
    expected, aux = attn(lq, lq if shared else lk, lv)
    leaves = [T(x, dtype).requires_grad_() for x in (q, v) + (() if shared else (k,))]
    out = F.attention(leaves[0], None if shared else leaves[2], leaves[1], T(mu, dtype), window=min(window, length),
                      causal=causal, shared_qk=shared, profile="lucidrains")
    close(out, N(expected), tol)
    # gradients: torch autograd through our attention vs through KmeansAttention
    ours = torch.autograd.grad(out, leaves, T(dout, dtype))
    theirs = torch.autograd.grad(expected, [lq, lv] + ([] if shared else [lk]), T(dout, dtype))
    for a, b in zip(ours, theirs, strict=True):
        close(a, N(b), gtol)
    # aux loss = commitment_loss over normalize(cat(q, k)) (q alone when shared)
    x = T(q if shared else np.concatenate([q, k], axis=2), dtype)
    loss = F.commitment_loss(F.normalize(x, profile="lucidrains"), T(mu, dtype))
    close(loss, float(aux.detach()), tol)


@needs_rt
def test_lucidrains_update_parity():
    heads, dim, clusters = 2, 4, 6
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, 3, heads, 10, dim))
    mu = rng.standard_normal((heads, clusters, dim))
    mu /= np.linalg.norm(mu, axis=-1, keepdims=True)
    x_hat = torch.nn.functional.normalize(T(np.concatenate([q, k], axis=2)), dim=-1)
    kmeans = rt.routing_transformer.Kmeans(heads, dim, clusters, ema_decay=0.9).double()
    with torch.no_grad():
        kmeans.means.copy_(T(mu))
        kmeans.initted.fill_(True)
        kmeans.update(rt.routing_transformer.kmeans_iter(x_hat, kmeans.means))
    state = F.CentroidState(T(mu), torch.zeros(heads, clusters, dtype=torch.float64),
                            torch.zeros(heads, clusters, dim, dtype=torch.float64))
    new = F.update_centroids(state, F.normalize(T(q), profile="lucidrains"), F.normalize(T(k), profile="lucidrains"),
                             profile="lucidrains", decay=0.9)
    torch.testing.assert_close(new.means, kmeans.means, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ CUDA


def test_cuda_matches_reference():
    if not torch.cuda.is_available():
        print("skipping: torch.cuda.is_available() is False (no CUDA device on this machine)")
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    shape = (2, 3, 37, 7, 5, 6, 8)
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        for profile, causal, shared in CONFIGS:
            q, k, v, mu, mask, dout = problem(shape, profile, causal, shared, True, dtype)
            kw = dict(window=8, causal=causal, shared_qk=shared, profile=profile)
            leaves = [T(x, dtype, "cuda").requires_grad_() for x in (q, v) + (() if shared else (k,))]
            out = F.attention(leaves[0], None if shared else leaves[2], leaves[1], T(mu, dtype, "cuda"),
                              key_padding_mask=T(mask, device="cuda"), **kw)
            assert out.device.type == "cuda" and out.dtype == DTYPES[dtype]
            close(out, ref.attention(q, k, v, mu, key_padding_mask=mask, **kw), FORWARD[dtype], f"{dtype} {profile}")
            grads = torch.autograd.grad(out, leaves, T(dout, dtype, "cuda"))
            dq, dk, dv = ref.attention_vjp(q, k, v, mu, dout, key_padding_mask=mask, **kw)
            for got, want in zip(grads, (dq, dv, dk), strict=True):
                close(got, want, GRADIENT[dtype], f"{dtype} {profile} grad")
        # route ties and padding on the device
        s = np.random.default_rng(0).integers(-2, 3, size=(3, 2, 29, 4)).astype(np.float64)
        m = np.random.default_rng(1).random((3, 29)) < 0.4
        np.testing.assert_array_equal(N(F.route(T(s, dtype, "cuda"), 8, key_padding_mask=T(m, device="cuda"))),
                                      ref.route(N(T(s, dtype)), 8, key_padding_mask=m))
        x = N(T(np.random.default_rng(2).standard_normal((2, 3, 29, 7)), dtype))
        np.testing.assert_array_equal(N(F.assign(T(x, dtype, "cuda"), T(mu, dtype, "cuda"))), ref.assign(x, mu))
        close(F.local_attention(T(q, dtype, "cuda"), T(q, dtype, "cuda"), T(v, dtype, "cuda"), 5, causal=True,
                                key_padding_mask=T(mask, device="cuda")),
              ref.local_attention(q, q, v, 5, causal=True, key_padding_mask=mask), FORWARD[dtype])
