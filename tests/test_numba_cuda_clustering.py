"""The Numba-CUDA clustering steps (normalize, similarity, route, assign, centroid update, commitment loss).

Two kinds of tests:

- host-side validation, here: the same exception type and message as the reference for bad inputs
  (validation happens before any launch, so no device and no simulator is needed);
- targeted kernel checks beyond the conformance grid (tie rules, special float values, edge cases,
  array layouts, several tiles and chunks), named ``test_simulated_*``: they need the CUDA simulator,
  which must be switched on before numba is imported, so :func:`test_kernels_in_the_simulator` runs
  them in a subprocess with NUMBA_ENABLE_CUDASIM=1 (they run directly when the suite itself is
  started with it). About 40 s on a 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

import refattn.routing as reference  # noqa: E402
from refattn.backends.numba_cuda import routing as clustering  # noqa: E402

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
simulated = pytest.mark.skipif(not SIMULATED, reason="needs the CUDA simulator (run by test_kernels_in_the_simulator)")

rng = np.random.default_rng(0)
B, H, L, D, C = 2, 2, 5, 3, 2
x = rng.standard_normal((B, H, L, D))
x_hat = reference.normalize(x)
centroids = rng.standard_normal((H, C, D))
s = reference.similarity(x_hat, centroids)
state = reference.CentroidState(centroids, np.ones((H, C)), rng.standard_normal((H, C, D)))
nan_x = x.copy()
nan_x[0, 1, 2, 0] = np.nan
inf_s = s.copy()
inf_s[1, 0, 0, 1] = np.inf
mask = np.zeros((B, L), dtype=bool)

CASES = {
    "normalize int": lambda ns: ns.normalize(x.astype(int)),
    "normalize 0-d": lambda ns: ns.normalize(np.asarray(1.0)),
    "normalize empty D": lambda ns: ns.normalize(np.zeros((2, 0))),
    "normalize nan": lambda ns: ns.normalize(nan_x),
    "normalize profile": lambda ns: ns.normalize(x, profile="tf"),
    "normalize profile first": lambda ns: ns.normalize(x.astype(int), profile="tf"),
    "normalize_vjp shape": lambda ns: ns.normalize_vjp(x, x[..., :2]),
    "normalize_vjp int": lambda ns: ns.normalize_vjp(x, x.astype(np.int32)),
    "normalize_vjp nan": lambda ns: ns.normalize_vjp(x, nan_x),
    "normalize_vjp profile": lambda ns: ns.normalize_vjp(x, x, profile="TACL"),
    "similarity rank": lambda ns: ns.similarity(x_hat[0], centroids),
    "similarity empty": lambda ns: ns.similarity(x_hat[:0], centroids),
    "similarity nan": lambda ns: ns.similarity(nan_x, centroids),
    "similarity centroids rank": lambda ns: ns.similarity(x_hat, centroids[0]),
    "similarity centroids heads": lambda ns: ns.similarity(x_hat, centroids[:1]),
    "similarity centroids dim": lambda ns: ns.similarity(x_hat, centroids[..., :2]),
    "similarity centroids empty": lambda ns: ns.similarity(x_hat, centroids[:, :0]),
    "similarity centroids int": lambda ns: ns.similarity(x_hat, centroids.astype(int)),
    "similarity_vjp ds shape": lambda ns: ns.similarity_vjp(x_hat, centroids, s[..., :1]),
    "similarity_vjp ds rank": lambda ns: ns.similarity_vjp(x_hat, centroids, s[0]),
    "similarity_vjp ds inf": lambda ns: ns.similarity_vjp(x_hat, centroids, inf_s),
    "route int": lambda ns: ns.route(s.astype(int), 2),
    "route rank": lambda ns: ns.route(s[0], 2),
    "route empty": lambda ns: ns.route(s[..., :0], 2),
    "route inf": lambda ns: ns.route(inf_s, 2),
    "route window 0": lambda ns: ns.route(s, 0),
    "route window above L": lambda ns: ns.route(s, L + 1),
    "route window float": lambda ns: ns.route(s, 2.0),
    "route window bool": lambda ns: ns.route(s, True),
    "route mask dtype": lambda ns: ns.route(s, 2, key_padding_mask=mask.astype(int)),
    "route mask shape": lambda ns: ns.route(s, 2, key_padding_mask=mask[:, :-1]),
    "assign centroids dim": lambda ns: ns.assign(x_hat, centroids[..., :1]),
    "assign mask shape": lambda ns: ns.assign(x_hat, centroids, key_padding_mask=mask[:1]),
    "assign nan": lambda ns: ns.assign(nan_x, centroids),
    "update state type": lambda ns: ns.update_centroids(centroids, x_hat),
    "update state length": lambda ns: ns.update_centroids(tuple(state)[:2], x_hat),
    "update means rank": lambda ns: ns.update_centroids((centroids[0], state.counts, state.sums), x_hat),
    "update means empty": lambda ns: ns.update_centroids((centroids[:, :0], state.counts, state.sums), x_hat),
    "update counts shape": lambda ns: ns.update_centroids((centroids, state.counts[:1], state.sums), x_hat),
    "update counts int": lambda ns: ns.update_centroids((centroids, state.counts.astype(int), state.sums), x_hat),
    "update sums shape": lambda ns: ns.update_centroids((centroids, state.counts, state.sums[..., :1]), x_hat),
    "update sums nan": lambda ns: ns.update_centroids((centroids, state.counts, state.sums * np.nan), x_hat),
    "update q heads": lambda ns: ns.update_centroids(state, x_hat[:, :1]),
    "update q dim": lambda ns: ns.update_centroids(state, x_hat[..., :2]),
    "update k shape": lambda ns: ns.update_centroids(state, x_hat, x_hat[:, :, :3]),
    "update k nan": lambda ns: ns.update_centroids(state, x_hat, nan_x),
    "update decay high": lambda ns: ns.update_centroids(state, x_hat, decay=1.5),
    "update decay low": lambda ns: ns.update_centroids(state, x_hat, decay=-0.1),
    "update decay text": lambda ns: ns.update_centroids(state, x_hat, decay="fast"),
    "update profile": lambda ns: ns.update_centroids(state, x_hat, profile="kmeans"),
    "update mask": lambda ns: ns.update_centroids(state, x_hat, key_padding_mask=mask.astype(float)),
    "commitment beta inf": lambda ns: ns.commitment_loss(x_hat, centroids, beta=np.inf),
    "commitment beta nan": lambda ns: ns.commitment_loss(x_hat, centroids, beta=float("nan")),
    "commitment beta text": lambda ns: ns.commitment_loss(x_hat, centroids, beta="small"),
    "commitment nan": lambda ns: ns.commitment_loss(nan_x, centroids),
    "commitment centroids heads": lambda ns: ns.commitment_loss(x_hat, centroids[:1]),
    "commitment mask dtype": lambda ns: ns.commitment_loss(x_hat, centroids, key_padding_mask=mask.astype(np.uint8)),
    "commitment_vjp beta": lambda ns: ns.commitment_loss_vjp(x_hat, centroids, beta=-np.inf),
    "commitment_vjp dloss": lambda ns: ns.commitment_loss_vjp(x_hat, centroids, "one"),
    "commitment_vjp mask shape": lambda ns: ns.commitment_loss_vjp(x_hat, centroids, key_padding_mask=mask.T),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_error_as_the_reference(name):
    call = CASES[name]
    with pytest.raises((TypeError, ValueError)) as expected:
        call(reference)
    with pytest.raises(type(expected.value)) as got:
        call(clustering)
    assert str(got.value) == str(expected.value)


def test_kernels_in_the_simulator():
    """Runs this file's ``test_simulated_*`` in a subprocess with the CUDA simulator switched on."""
    if SIMULATED:
        pytest.skip("already in the simulator: the simulated tests run directly")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "simulated"],
                          env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


# ---------------------------------------------------------------- in the simulator

DTYPES = (np.float64, np.float32)


def _route_both(scores: np.ndarray, window: int, padding: np.ndarray | None = None) -> None:
    """The device route of ``scores`` (in its dtype) equals the reference's on the same values."""
    got = clustering.route(scores, window, key_padding_mask=padding)
    want = reference.route(scores.astype(np.float64), window, key_padding_mask=padding)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


@simulated
@pytest.mark.parametrize("dtype", DTYPES)
def test_simulated_route_ties_padding_and_short_rows(dtype):
    """Exact ties go to the lower position, -0 equals +0, padded tokens are never taken, rows with
    fewer than W unpadded tokens end in -1, a wholly padded row is all -1."""
    values = np.array([0.0, -0.0, 1.0, -1.0, 2.0])
    scores = values[np.random.default_rng(1).integers(0, 5, (2, 1, 9, 2))].astype(dtype)
    padding = np.zeros((2, 9), dtype=bool)
    padding[0, [0, 3, 4, 8]] = True
    padding[1] = True
    for window in (1, 5):
        _route_both(scores, window)
    for window in (4, 9):
        _route_both(scores, window, padding)
    members = clustering.route(scores, 6, key_padding_mask=padding)
    assert (members[1] == -1).all() and (members[0, ..., 5:] == -1).all()


@simulated
@pytest.mark.parametrize("dtype", DTYPES)
def test_simulated_route_order_keys_of_special_values(dtype):
    """The int64 order keys are exact for subnormals, the extremes and neighbours one ulp apart."""
    info = np.finfo(dtype)
    tiny = info.smallest_subnormal
    special = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, info.smallest_normal, -info.smallest_normal,
                        info.smallest_normal - tiny, info.max, -info.max, 1.0, np.nextafter(dtype(1.0), dtype(2.0)),
                        np.nextafter(dtype(1.0), dtype(0.0)), -1.0, 0.5, 2.0], dtype=dtype)
    order = np.random.default_rng(2).permutation(special.size)
    scores = np.stack([special[order], -special[order]], axis=-1)[None, None]  # (1, 1, 16, 2)
    for window in (1, 8, 15):
        _route_both(scores, window)


@simulated
def test_simulated_route_several_chunks_and_all_passes():
    """L > 256 (two chunks of positions per block) with heavy ties, so that the radix select runs to
    the last digit; one row per (b, h, c)."""
    scores = np.random.default_rng(3).integers(0, 4, (1, 1, 300, 2)).astype(np.float32)
    scores[0, 0, :, 1] += np.linspace(0, 1e-3, 300, dtype=np.float32)  # distinct values in the second row
    for window in (150, 299):
        _route_both(scores, window)


@simulated
def test_simulated_similarity_assign_several_tiles():
    """L, C and D above the 16-wide tiles (several output tiles and staged chunks); assign ties
    (duplicated centroids) go to the lower index; padded positions get -1."""
    generator = np.random.default_rng(4)
    tokens = reference.normalize(generator.standard_normal((1, 1, 18, 17)))
    means = generator.standard_normal((1, 20, 17))
    means[:, 19] = means[:, 3]  # an exact tie between centroids 3 and 19
    means[:, 18] = 0.5 * means[:, 3]
    np.testing.assert_allclose(clustering.similarity(tokens, means), reference.similarity(tokens, means),
                               rtol=1e-12, atol=1e-12)
    ds = generator.standard_normal((1, 1, 18, 20))
    for got, want in zip(clustering.similarity_vjp(tokens, means, ds), reference.similarity_vjp(tokens, means, ds),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    tokens[0, :, 5] = means[:, 3] / np.linalg.norm(means[:, 3], axis=-1, keepdims=True)  # ties at position 5
    padding = np.zeros((1, 18), dtype=bool)
    padding[0, [0, 17]] = True
    labels = clustering.assign(tokens, means, key_padding_mask=padding)
    np.testing.assert_array_equal(labels, reference.assign(tokens, means, key_padding_mask=padding))
    assert (labels[0, :, 5] == 3).all() and (labels[0, :, [0, 17]] == -1).all()


@simulated
def test_simulated_normalize_layouts_and_degenerate_rows():
    """Any rank, strided device views (4-D in place, other ranks through a device copy), no rows,
    D = 1 (tacl gives 0), a zero row (lucidrains keeps it 0, its gradient is the clamp's dy / eps)."""
    from numba import cuda

    generator = np.random.default_rng(5)
    for profile in ("tacl", "lucidrains"):
        for array in (generator.standard_normal(7), generator.standard_normal((3, 4, 6)), np.zeros((0, 4)),
                      generator.standard_normal((2, 3, 4, 1)), np.zeros((1, 1, 2, 5))):
            np.testing.assert_allclose(clustering.normalize(array, profile=profile),
                                       reference.normalize(array, profile=profile), rtol=1e-12, atol=1e-12)
            dy = generator.standard_normal(array.shape)
            np.testing.assert_allclose(clustering.normalize_vjp(array, dy, profile=profile),
                                       reference.normalize_vjp(array, dy, profile=profile), rtol=1e-12, atol=1e-9)
        base = generator.standard_normal((2, 3, 6, 4))
        for view in (lambda a: a[:, 1:, ::2], lambda a: a[1, :, 1:4]):  # strided 4-D and 3-D views
            got = clustering.normalize(view(cuda.to_device(base)), profile=profile)
            assert not isinstance(got, np.ndarray)
            np.testing.assert_allclose(got.copy_to_host(), reference.normalize(view(base), profile=profile),
                                       rtol=1e-12, atol=1e-12)


@simulated
def test_simulated_normalize_overflow_is_the_reference_error():
    """x near float64's largest value: the row's sum overflows in any order and tacl's x̂ is NaN; the
    reference's rule, OVERFLOWS["normalize"], reports it with the reference's message."""
    huge = np.random.default_rng(6).uniform(0.5, 1.0, (1, 2, 3, 8)) * 1.5e308
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError) as expected:
            reference.normalize(huge)
        with pytest.raises(ValueError) as got:
            clustering.normalize(huge)
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith("x overflows float64 in the normalization: |x| up to 1.5e+308")


@simulated
def test_simulated_update_centroids_edge_cases():
    """tacl: a first update on an all-padded batch keeps the means (n = 0); lucidrains: a centroid
    that no token chose keeps its mean. The input state is not modified; device in, device out."""
    from numba import cuda

    generator = np.random.default_rng(6)
    means = generator.standard_normal((2, 3, 4))
    tokens = reference.normalize(generator.standard_normal((2, 2, 5, 4)))
    empty = reference.CentroidState(means, np.zeros((2, 3)), means.copy())
    all_padded = np.ones((2, 5), dtype=bool)
    for got, want in zip(clustering.update_centroids(empty, tokens, tokens, key_padding_mask=all_padded),
                         reference.update_centroids(empty, tokens, tokens, key_padding_mask=all_padded), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(empty.means, means)
    lone = means.copy()
    lone[:, 2] = -10 * np.abs(lone[:, 2])  # opposite every token (all their entries are positive)
    tokens = reference.normalize(np.abs(generator.standard_normal((2, 2, 5, 4))), profile="lucidrains")
    assert not (reference.assign(tokens, lone) == 2).any()
    state = reference.CentroidState(lone, np.ones((2, 3)), generator.standard_normal((2, 3, 4)))
    device_state = reference.CentroidState(*(cuda.to_device(part) for part in state))
    got = clustering.update_centroids(device_state, cuda.to_device(tokens), profile="lucidrains", decay=0.5)
    want = reference.update_centroids(state, tokens, profile="lucidrains", decay=0.5)
    assert isinstance(got, reference.CentroidState) and not isinstance(got.means, np.ndarray)
    for part, wanted in zip(got, want, strict=True):
        np.testing.assert_allclose(part.copy_to_host(), wanted, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.means.copy_to_host()[:, 2], lone[:, 2], rtol=1e-12)
    np.testing.assert_array_equal(device_state.means.copy_to_host(), lone)


@simulated
def test_simulated_commitment_loss_padding_and_types():
    """A Python float; 0 (and a zero gradient) with every token padded; mixed float32 and float64
    inputs compute in float64."""
    generator = np.random.default_rng(7)
    tokens = reference.normalize(generator.standard_normal((2, 2, 6, 3)))
    means = generator.standard_normal((2, 4, 3))
    padding = np.zeros((2, 6), dtype=bool)
    padding[1, 2:] = True
    loss = clustering.commitment_loss(tokens.astype(np.float32), means, beta=0.5, key_padding_mask=padding)
    assert type(loss) is float
    assert loss == pytest.approx(reference.commitment_loss(tokens.astype(np.float32), means, beta=0.5,
                                                           key_padding_mask=padding), rel=1e-12)
    grad = clustering.commitment_loss_vjp(tokens.astype(np.float32), means, 2.0, beta=0.5, key_padding_mask=padding)
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, reference.commitment_loss_vjp(tokens.astype(np.float32), means, 2.0, beta=0.5,
                                                                   key_padding_mask=padding), rtol=1e-12, atol=1e-15)
    everything = np.ones((2, 6), dtype=bool)
    assert clustering.commitment_loss(tokens, means, key_padding_mask=everything) == 0.0
    assert not clustering.commitment_loss_vjp(tokens, means, key_padding_mask=everything).any()


@simulated
def test_simulated_device_inputs_are_validated_on_the_device():
    """NaN in a device array is counted where it lives, with the reference's message; a device mask works."""
    from numba import cuda

    with pytest.raises(ValueError) as expected:
        reference.similarity(nan_x, centroids)
    with pytest.raises(ValueError) as got:
        clustering.similarity(cuda.to_device(nan_x), cuda.to_device(centroids))
    assert str(got.value) == str(expected.value)
    padding = np.zeros((B, L), dtype=bool)
    padding[0, 1] = True
    members = clustering.route(cuda.to_device(np.ascontiguousarray(s)), 3, key_padding_mask=cuda.to_device(padding))
    np.testing.assert_array_equal(members.copy_to_host(), reference.route(s, 3, key_padding_mask=padding))
