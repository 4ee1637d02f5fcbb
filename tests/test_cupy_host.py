"""Host-side tests of the CuPy backend that need no GPU.

The backend's host code is written against an array namespace; inside ``host_execution()`` it runs
with NumPy, so everything except the CUDA kernels (validation, shapes, dtypes, launch configuration,
FFT cross, selection, routing) is exercised here against the reference. The kernels themselves are
compile-checked (test_cupy_kernels.py), executed as CUDA C emulated on the CPU (test_cupy_emulation.py)
and run on a GPU (test_cupy_gpu.py).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

import refattn.fsat as ref_fsat
import refattn.routing as ref_routing
from refattn import backends
from refattn.backends.cupy import _config, fsat, host_execution, routing


@pytest.fixture(autouse=True)
def _host():
    with host_execution():
        yield


def _rng(seed=0):
    return np.random.default_rng(seed)


def _mask(rng, batch, length):
    mask = np.zeros((batch, length), dtype=bool)
    mask[0, length - max(1, length // 3):] = True
    mask[1:, rng.permutation(length)[: length // 3]] = True
    return mask


# ------------------------------------------------------------------ backend, registry, CLI


def test_backend_loads_without_a_device_and_says_why():
    backend = backends.get_backend("cupy")
    assert backend.capabilities.devices == ()
    assert backend.capabilities.unavailable.startswith("no CUDA device")
    assert backend.capabilities.dtypes == ("float64", "float32", "float16")
    assert "no CUDA device" in backend.status


def test_conformance_cli_reports_the_backend_skipped():
    result = subprocess.run([sys.executable, "-m", "refattn", "conformance", "--backend", "cupy"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skip" in result.stdout and "no device: no CUDA device" in result.stdout
    assert "0 failed" in result.stdout


def test_info_lists_the_backend():
    result = subprocess.run([sys.executable, "-m", "refattn", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["cupy"] and "no CUDA device" in line for line in result.stdout.splitlines())


def test_numpy_arrays_are_refused_outside_host_mode():
    x = np.zeros((1, 1, 2, 2))
    from refattn.backends.cupy import _array

    previous = _array._host.enabled
    _array._host.enabled = False
    try:
        with pytest.raises(TypeError, match="a: expected a CuPy array"):
            fsat.cross(x, x)
    finally:
        _array._host.enabled = previous


# ------------------------------------------------------------------ launch configuration


@pytest.mark.parametrize("bh, length, columns, grid, tiles", [
    (1, 1, 1, (1, 1, 1), 1),
    (6, 7, 5, (12, 1, 1), 2),
    (4, 8, 128, (8, 1, 1), 2),
    (4, 9, 129, (12, 2, 1), 3),
    (2, 1000, 300, (500, 3, 1), 250),
])
def test_row_launch(bh, length, columns, grid, tiles):
    launch = _config.row_launch(bh, length, columns)
    assert launch.grid == grid and launch.tiles == tiles
    assert launch.block == (_config.WARPS_PER_BLOCK * 32, 1, 1)
    # every (bh, row) pair is covered exactly once by blockIdx.x = bh * tiles + tile, row = tile * warps + warp
    rows = {(x // launch.tiles, (x % launch.tiles) * _config.WARPS_PER_BLOCK + w)
            for x in range(launch.grid[0]) for w in range(_config.WARPS_PER_BLOCK)}
    assert {(b, r) for b, r in rows if r < length} == {(b, r) for b in range(bh) for r in range(length)}
    assert launch.grid[1] * _config.CHUNK >= columns > (launch.grid[1] - 1) * _config.CHUNK


def test_row_launch_rejects_grids_over_the_limit():
    with pytest.raises(ValueError, match="grid limit"):
        _config.row_launch(2**30, 16, 4)
    with pytest.raises(ValueError, match="grid limit"):
        _config.row_launch(1, 1, _config.CHUNK * (_config.MAX_GRID_Y + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 11, 13, 17, 97, 127, 1000, 4097])
def test_fft_length(n):
    m = _config.fft_length(n)
    assert m >= n
    rest = m
    for p in (2, 3, 5, 7):
        while rest % p == 0:
            rest //= p
    assert rest == 1
    assert all(not _is_smooth(x) for x in range(n, m))


def _is_smooth(x):
    for p in (2, 3, 5, 7):
        while x % p == 0:
            x //= p
    return x == 1


def test_accumulation_dtypes():
    assert _config.accumulation_dtype(np.float16) == np.float32
    assert _config.accumulation_dtype(np.float32) == np.float32
    assert _config.accumulation_dtype(np.float64) == np.float64
    with pytest.raises(TypeError, match="supports"):
        _config.accumulation_dtype(np.int32)


def test_kernels_do_not_run_without_a_device(monkeypatch):
    monkeypatch.delenv("REFATTN_CUDA_EMULATION", raising=False)  # which would run them emulated on the CPU
    rng = _rng()
    q = rng.standard_normal((1, 1, 3, 2))
    with pytest.raises(RuntimeError, match=r"fsat_sparse_forward<double>: a CUDA kernel cannot run"):
        fsat.sparse_attention(q, q, q, np.array([[[0, 1]]]))


# ------------------------------------------------------------------ validation, one case each


def _q(shape=(2, 2, 5, 3), seed=0):
    return _rng(seed).standard_normal(shape)


VALIDATION = [
    ("cross int", lambda: fsat.cross(np.ones((1, 1, 2, 2), dtype=np.int64), _q((1, 1, 2, 2))),
     TypeError, "a: expected a real floating"),
    ("cross rank", lambda: fsat.cross(_q((2, 5, 3)), _q((2, 5, 3))),
     ValueError, "a: expected a 4-D array"),
    ("cross shape", lambda: fsat.cross(_q(), _q((2, 2, 4, 3))),
     ValueError, "b: expected shape"),
    ("cross nan", lambda: fsat.cross(np.full((1, 1, 2, 2), np.nan), _q((1, 1, 2, 2))),
     ValueError, "a: expected finite values"),
    ("cross empty axis", lambda: fsat.cross(np.zeros((1, 0, 2, 2)), np.zeros((1, 0, 2, 2))),
     ValueError, "at least 1"),
    ("bfloat-like unsupported dtype", lambda: fsat.cross(_q().astype(np.longdouble), _q().astype(np.longdouble)),
     TypeError, "supports the dtypes"),
    ("mask dtype", lambda: fsat.cross(_q(), _q(), key_padding_mask=np.zeros((2, 5), dtype=np.int8)),
     TypeError, "key_padding_mask: expected a bool"),
    ("mask shape", lambda: fsat.cross(_q(), _q(), key_padding_mask=np.zeros((2, 4), dtype=bool)),
     ValueError, "key_padding_mask: expected shape"),
    ("pair_counts length", lambda: fsat.pair_counts(0),
     ValueError, "length: expected an integer in"),
    ("estimate even", lambda: fsat.estimate(_q((1, 1, 4, 3)), _q((1, 3))[0:1]),
     ValueError, "c: expected 2L - 1 offsets"),
    ("estimate w", lambda: fsat.estimate(_q((1, 1, 5, 3)), _q((1, 1, 4))[0]),
     ValueError, "w: expected shape"),
    ("select top_k", lambda: fsat.select(_q((1, 1, 5)), 0),
     ValueError, "top_k: expected an integer in"),
    ("select top_k type", lambda: fsat.select(_q((1, 1, 5)), 2.0),
     TypeError, "top_k: expected an integer"),
    ("select +inf", lambda: fsat.select(np.full((1, 1, 5), np.inf), 2),
     ValueError, "s: expected finite values or -inf"),
    ("select noise shape", lambda: fsat.select(_q((1, 1, 5)), 2, noise=_q((1, 1, 3))),
     ValueError, "noise: expected shape"),
    ("offsets range", lambda: fsat.sparse_attention(_q(), _q(), _q(), np.array([[[0, 5]]] * 2).repeat(2, 1)),
     ValueError, "offsets: expected offsets in"),
    ("offsets repeated", lambda: fsat.sparse_attention(_q(), _q(), _q(), np.zeros((2, 2, 2), dtype=np.int64)),
     ValueError, "offsets: expected distinct"),
    ("offsets dtype", lambda: fsat.sparse_attention(_q(), _q(), _q(), np.zeros((2, 2, 1))),
     TypeError, "offsets: expected an integer array"),
    ("offsets empty", lambda: fsat.sparse_attention(_q(), _q(), _q(), np.zeros((2, 2, 0), dtype=np.int64)),
     ValueError, "at least one offset"),
    ("bias shape", lambda: fsat.sparse_attention(_q(), _q(), _q(), np.zeros((2, 2, 1), dtype=np.int64), _q((2, 2, 2))),
     ValueError, "bias: expected shape"),
    ("bias nan",
     lambda: fsat.sparse_attention(_q(), _q(), _q(), np.zeros((2, 2, 1), dtype=np.int64), np.full((2, 2, 1), np.nan)),
     ValueError, "bias: expected finite values or -inf"),
    ("vjp dout",
     lambda: fsat.sparse_attention_vjp(_q(), _q(), _q(), np.zeros((2, 2, 1), dtype=np.int64), None, _q((2, 2, 5, 4))),
     ValueError, "dout: expected shape"),
    ("vjp dlse",
     lambda: fsat.sparse_attention_vjp(_q(), _q(), _q(), np.zeros((2, 2, 1), dtype=np.int64), None, _q(),
                                       dlse=_q((2, 2, 4))),
     ValueError, "dlse: expected shape"),
    ("attention cross pair", lambda: fsat.attention(_q(), _q(), _q(), _q((2, 3))[:, :3], 2, cross_q=_q()),
     ValueError, "cross_k: cross_q and cross_k must be given together"),
    ("attention w", lambda: fsat.attention(_q(), _q(), _q(), _q((3, 3)), 2),
     ValueError, "w: expected shape"),
    ("routing profile", lambda: routing.normalize(_q(), profile="tf"),
     ValueError, "profile: expected one of"),
    ("routing shared k", lambda: routing.attention(_q(), _q(), _q(), _q((2, 2, 3)), shared_qk=True),
     ValueError, "k: expected None with shared_qk"),
    ("routing lucidrains causal unshared",
     lambda: routing.attention(_q(), _q(), _q(), _q((2, 2, 3)), causal=True, profile="lucidrains"),
     ValueError, "does not support causal=True"),
    ("routing window", lambda: routing.attention(_q(), _q(), _q(), _q((2, 2, 3)), window=6),
     ValueError, "window: expected an integer in"),
    ("routing centroids", lambda: routing.similarity(_q(), _q((3, 2, 3))),
     ValueError, "centroids: expected shape"),
    ("routing members range", lambda: routing.combine(_q((2, 2, 2, 2, 3)), np.full((2, 2, 2, 2), 5), 5),
     ValueError, "q_members: expected positions in"),
    ("routing members repeated",
     lambda: routing.combine(_q((2, 2, 1, 2, 3)), np.zeros((2, 2, 1, 2), dtype=np.int64), 5),
     ValueError, "q_members: expected distinct"),
    ("routing block", lambda: routing.local_attention(_q(), _q(), _q(), 0),
     ValueError, "block: expected an integer in"),
    ("routing decay",
     lambda: routing.update_centroids(routing.CentroidState(_q((2, 2, 3)), np.ones((2, 2)), _q((2, 2, 3))), _q(),
                                      decay=2.0),
     ValueError, "decay: expected a number"),
    ("routing beta", lambda: routing.commitment_loss(_q(), _q((2, 2, 3)), beta=float("nan")),
     ValueError, "beta: expected a finite number"),
    ("routing rng", lambda: routing.init_centroids(2, 2, 3, rng=0),
     TypeError, "rng: expected a numpy.random.Generator"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in VALIDATION],
                         ids=[case[0] for case in VALIDATION])
def test_validation(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------ host-mode numerics against the reference


SHAPES = [(2, 2, 1, 3), (2, 2, 5, 3), (2, 3, 8, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fsat_steps_match_the_reference(shape, padded, dtype):
    rng = _rng(1)
    batch, heads, length, dim = shape
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    mask = _mask(rng, batch, length) if padded and length > 1 else None
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    c = fsat.cross(a.astype(dtype), b.astype(dtype), key_padding_mask=mask)
    assert c.dtype == dtype
    np.testing.assert_allclose(c, ref_fsat.cross(a.astype(dtype), b.astype(dtype), key_padding_mask=mask), **tol)
    np.testing.assert_array_equal(fsat.pair_counts(length, mask), ref_fsat.pair_counts(length, mask))
    dc = rng.standard_normal(c.shape)
    for got, want in zip(fsat.cross_vjp(a.astype(dtype), b.astype(dtype), dc.astype(dtype), key_padding_mask=mask),
                         ref_fsat.cross_vjp(a.astype(dtype), b.astype(dtype), dc.astype(dtype), key_padding_mask=mask),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    w = rng.standard_normal((heads, dim)).astype(dtype)
    c64 = ref_fsat.cross(a, b, key_padding_mask=mask)
    s = fsat.estimate(c64.astype(dtype), w, key_padding_mask=mask)
    np.testing.assert_allclose(s, ref_fsat.estimate(c64.astype(dtype), w, key_padding_mask=mask), **tol)
    ds = rng.standard_normal(s.shape)
    for got, want in zip(fsat.estimate_vjp(c64, w.astype(np.float64), ds, key_padding_mask=mask),
                         ref_fsat.estimate_vjp(c64, w, ds, key_padding_mask=mask), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("length", [1, 2, 5, 9])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 64])
def test_select_matches_the_reference_including_ties(length, causal, top_k):
    rng = _rng(length)
    s = rng.integers(-2, 3, size=(2, 3, 2 * length - 1)).astype(np.float64)  # many exact ties
    s[0, 0, rng.permutation(2 * length - 1)[: length // 2]] = -np.inf
    noise = np.round(rng.gumbel(size=s.shape)) if length % 2 else None
    np.testing.assert_array_equal(fsat.select(s, top_k, causal=causal, noise=noise),
                                  ref_fsat.select(s, top_k, causal=causal, noise=noise))


ROUTING = [(2, 2, 1, 3, 3, 2, 1), (2, 2, 5, 3, 2, 2, 3), (2, 3, 8, 4, 6, 3, 4)]


@pytest.mark.parametrize("shape", ROUTING)
@pytest.mark.parametrize("profile", ["tacl", "lucidrains"])
@pytest.mark.parametrize("causal, shared", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("padded", [False, True])
def test_routing_matches_the_reference(shape, profile, causal, shared, padded):
    if profile == "lucidrains" and causal and not shared:
        pytest.skip("rejected configuration")
    batch, heads, length, dim, dim_v, clusters, window = shape
    rng = _rng(7)
    q = rng.standard_normal((batch, heads, length, dim))
    k = None if shared else rng.standard_normal((batch, heads, length, dim))
    v = rng.standard_normal((batch, heads, length, dim_v))
    centroids = rng.standard_normal((heads, clusters, dim))
    mask = _mask(rng, batch, length) if padded and length > 1 else None
    dout = rng.standard_normal(v.shape)
    options = dict(window=window, causal=causal, shared_qk=shared, profile=profile, key_padding_mask=mask)
    np.testing.assert_allclose(routing.attention(q, k, v, centroids, **options),
                               ref_routing.attention(q, k, v, centroids, **options), rtol=1e-9, atol=1e-11)
    for got, want in zip(routing.attention_vjp(q, k, v, centroids, dout, **options),
                         ref_routing.attention_vjp(q, k, v, centroids, dout, **options), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    x_hat = ref_routing.normalize(q, profile=profile)
    s = ref_routing.similarity(x_hat, centroids)
    np.testing.assert_array_equal(routing.route(s, window, key_padding_mask=mask),
                                  ref_routing.route(s, window, key_padding_mask=mask))
    np.testing.assert_array_equal(routing.assign(x_hat, centroids, key_padding_mask=mask),
                                  ref_routing.assign(x_hat, centroids, key_padding_mask=mask))
    np.testing.assert_allclose(routing.normalize(q, profile=profile), x_hat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(routing.normalize_vjp(q, dout[..., :1] + q, profile=profile),
                               ref_routing.normalize_vjp(q, dout[..., :1] + q, profile=profile), rtol=1e-9, atol=1e-11)
    ds = rng.standard_normal(s.shape)
    for got, want in zip(routing.similarity_vjp(x_hat, centroids, ds),
                         ref_routing.similarity_vjp(x_hat, centroids, ds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(routing.commitment_loss(x_hat, centroids, key_padding_mask=mask),
                               ref_routing.commitment_loss(x_hat, centroids, key_padding_mask=mask), rtol=1e-9)
    np.testing.assert_allclose(routing.commitment_loss_vjp(x_hat, centroids, key_padding_mask=mask),
                               ref_routing.commitment_loss_vjp(x_hat, centroids, key_padding_mask=mask), rtol=1e-9,
                               atol=1e-15)
    state = ref_routing.CentroidState(centroids, rng.uniform(0.5, 2, (heads, clusters)),
                                      rng.standard_normal(centroids.shape))
    k_hat = None if k is None else ref_routing.normalize(k, profile=profile)
    update = dict(profile=profile, key_padding_mask=mask, decay=0.9)
    for got, want in zip(routing.update_centroids(state, x_hat, k_hat, **update),
                         ref_routing.update_centroids(state, x_hat, k_hat, **update), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    keys, local = q if k is None else k, dict(causal=causal, key_padding_mask=mask)
    for got, want in zip(routing.local_attention_vjp(q, keys, v, 2, dout, **local),
                         ref_routing.local_attention_vjp(q, keys, v, 2, dout, **local), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(routing.local_attention(q, keys, v, 2, **local),
                               ref_routing.local_attention(q, keys, v, 2, **local), rtol=1e-9, atol=1e-11)


def test_init_centroids_draws_like_the_reference():
    got = routing.init_centroids(2, 3, 4, rng=np.random.default_rng(5))
    want = ref_routing.init_centroids(2, 3, 4, rng=np.random.default_rng(5))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_float16_is_accumulated_in_float32_and_returned_in_float16():
    rng = _rng(3)
    q = rng.standard_normal((2, 2, 6, 4)).astype(np.float16)
    c = fsat.cross(q, q)
    assert c.dtype == np.float16
    np.testing.assert_allclose(c.astype(np.float64), ref_fsat.cross(q, q), rtol=5e-3, atol=2e-3)
    x = routing.normalize(q)
    assert x.dtype == np.float16
