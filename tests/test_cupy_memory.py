"""The CuPy backend's device-memory plans and chunking, without a GPU.

- Backend.plans at the realistic shapes (B = H = 16, L = 65,536, C = W = 256; FSAT's D = 64 and 128,
  K = 16) and over the audit's table (B·H 1 to 65,536, L 1 to 1,048,576): every launch within CUDA's
  limits, every peak within its bound, computed in milliseconds without allocating.
- The plans against what the calls do: every function runs as CUDA C emulated on the CPU (NumPy arrays,
  whose allocations tracemalloc sees) with a small chunk budget, and its measured peak beyond its inputs
  stays within the planned peak; the measured peaks of the steps the review found unbounded (the local
  attention's logits, the routing's sort, the cluster gradient's full buffers) are far below what the
  unchunked code allocated.
- Chunking changes nothing: the results with one head (one block) per chunk equal the reference's.
"""

from __future__ import annotations

import importlib
import time
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install 'refattn[cupy]')")

import refattn.fsat as ref_fsat
import refattn.routing as ref_routing
from refattn.backends import cuda_emulation
from refattn.backends.cupy import fsat, memory, plans, routing
from refattn.backends.launch import Shape

REALISTIC = Shape(16, 16, 65_536, 64, 64, top_k=16, clusters=256, window=256)
H200_BYTES = 141 * 10**9


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setenv(cuda_emulation.ENVIRONMENT_VARIABLE, "1")


def _plan(shape, dtype, name):
    return next(plan for plan in plans.plans(shape, dtype) if plan.function == name)


# ------------------------------------------------------------------ the plans at realistic and audit shapes


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("dim", [64, 128])
def test_every_plan_respects_its_bound_at_the_realistic_shapes(dtype, dim):
    shape = Shape(16, 16, 65_536, dim, dim, top_k=16, clusters=256, window=256)
    found = plans.plans(shape, dtype)
    assert {plan.function for plan in found} >= {f"fsat.{f}" for f in fsat.__all__ if f != "FSATGrads"} | {
        f"routing.{f}" for f in routing.__all__
        if f not in ("CentroidState", "init_centroids", "default_num_clusters", "default_window")}
    problems = [f"{plan.function}: {problem}" for plan in found for problem in plan.violations()]
    assert not problems, "\n".join(problems)


def test_routing_fits_one_h200_at_the_realistic_shape_in_float32():
    peaks = {plan.function: plan.peak_bytes for plan in plans.plans(REALISTIC, "float32")}
    for name in ("routing.attention", "routing.attention_vjp", "routing.local_attention",
                 "routing.local_attention_vjp", "routing.cluster_attention_vjp", "routing.route"):
        inputs = 4 * 16 * 16 * 65_536 * 64 * 4  # q, k, v, dout
        assert peaks[name] + inputs < H200_BYTES / 2, name
    b, h, n, d, w, c = 16, 16, 65_536, 64, 256, 256
    logits = b * h * (n // w) * w * 3 * w * 4  # the (B, H, L/W, W, 3W) logits the unchunked code formed
    assert peaks["routing.local_attention_vjp"] - 3 * b * h * n * d * 4 < logits / 10  # beyond dq, dk, dv
    argsort = b * h * c * n * 8  # the int64 indices of an argsort of all B·H·C·L similarities
    assert peaks["routing.route"] - b * h * c * w * 8 < argsort / 50  # beyond the members: one head's rows


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("dim", [64, 128])
def test_routing_at_the_realistic_shapes_is_linear_in_b_h_l_d_plus_w_beyond_one_chunk(dtype, dim):
    """Regression: at B = H = 16, L = 65,536, C = W = 256 the local attention formed three (B, H, L/W, W, 3W)
    arrays (9·B·H·L·W words; the routing's sort: test_routing_fits_one_h200_...). Every routing function's
    planned peak (the exact bytes of the plan model) is now at most 3·B·H·L·(D + W) words of the compute
    dtype beyond one chunk of CHUNK_BYTES: the O(B·H·L·(D + W)) plus bounded chunk buffers of the issue."""
    b, h, n, c, w = 16, 16, 65_536, 256, 256
    word = 8 if dtype == "float64" else 4  # float16 is computed in float32
    allowed = 3 * b * h * n * (dim + w) * word + memory.CHUNK_BYTES
    peaks = {plan.function: plan.peak_bytes for plan in plans.plans(Shape(b, h, n, dim, dim, top_k=16, clusters=c,
                                                                          window=w), dtype)}
    routing_peaks = {name: peak for name, peak in peaks.items() if name.startswith("routing.")}
    assert len(routing_peaks) == 17
    too_large = {name: peak for name, peak in routing_peaks.items() if peak > allowed}
    assert not too_large, f"allowed {allowed} B: {too_large}"
    assert 9 * b * h * n * w * word > allowed  # what the unchunked local attention held


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_plans_over_the_audit_table_are_cheap_and_within_cuda_limits(dtype):
    started = time.perf_counter()
    count = 0
    for batch_heads in (1, 8, 256, 65_536):
        for length in (1, 2, 1_023, 65_536, 1_048_576):
            for dim in (64, 128):
                for window in (1, 64, 256):
                    window = min(window, length)
                    shape = Shape(batch_heads if batch_heads < 16 else batch_heads // 16, min(batch_heads, 16),
                                  length, dim, dim, top_k=16, clusters=min(256, length), window=window)
                    for plan in plans.plans(shape, dtype):
                        count += 1
                        assert not plan.violations(), (shape.label(), plan.function, plan.violations())
    assert count > 2_000
    assert time.perf_counter() - started < 10


def test_the_sparse_kernels_are_split_where_one_grid_would_pass_cudas_limit():
    shape = Shape(4_096, 16, 1_048_576, 128, 128)  # B·H = 65,536 heads of 262,144 row tiles each
    launches = _plan(shape, "float16", "fsat.attention").launches
    assert all(not launch.violations() for launch in launches)
    assert max(launch.grid[0] for launch in launches) <= 2**31 - 1
    assert max(launch.largest_index for launch in launches) > 2**31  # 64-bit indices, which the kernels use


def test_plans_need_no_supported_dtype_beyond_the_backends():
    assert plans.plans(REALISTIC, "bfloat16") == ()


# ------------------------------------------------------------------ the plans against the emulated calls

B, H, L, D, DV, K, C, W = 2, 3, 40, 8, 6, 5, 4, 10
RNG = np.random.default_rng(7)
X = {name: RNG.standard_normal((B, H, L, D)) for name in ("q", "k")}
X["v"] = X["dout"] = RNG.standard_normal((B, H, L, DV))
X["w"] = RNG.standard_normal((H, D))
X["centroids"] = ref_routing.init_centroids(H, C, D, rng=np.random.default_rng(1)).means
X["members"] = ref_routing.route(ref_routing.similarity(ref_routing.normalize(X["q"]), X["centroids"]), W)
X["o"] = RNG.standard_normal((B, H, C, W, DV))
X["offsets"] = np.stack([np.sort(RNG.permutation(np.arange(-L + 1, L))[:K]) for _ in range(B * H)]).reshape(B, H, K)
X["similarities"] = RNG.standard_normal((B, H, L, C))
X["c"] = RNG.standard_normal((B, H, 2 * L - 1, D))
X["mask"] = np.zeros((B, L), dtype=bool)
X["mask"][1, ::5] = True

CALLS = {
    "fsat.cross": lambda ns, x: ns.cross(x["q"], x["k"], key_padding_mask=x["mask"]),
    "fsat.cross_vjp": lambda ns, x: ns.cross_vjp(x["q"], x["k"], x["c"], key_padding_mask=x["mask"]),
    "fsat.estimate": lambda ns, x: ns.estimate(x["c"], x["w"]),
    "fsat.select": lambda ns, x: ns.select(x["c"][..., 0], K),
    "fsat.sparse_attention": lambda ns, x: ns.sparse_attention(x["q"], x["k"], x["v"], x["offsets"]),
    "fsat.sparse_attention_vjp": lambda ns, x: ns.sparse_attention_vjp(x["q"], x["k"], x["v"], x["offsets"], None,
                                                                         x["dout"]),
    "fsat.attention": lambda ns, x: ns.attention(x["q"], x["k"], x["v"], x["w"], K, key_padding_mask=x["mask"]),
    "fsat.attention_vjp": lambda ns, x: ns.attention_vjp(x["q"], x["k"], x["v"], x["w"], K, x["dout"],
                                                         key_padding_mask=x["mask"]),
    "routing.normalize": lambda ns, x: ns.normalize(x["q"]),
    "routing.similarity": lambda ns, x: ns.similarity(x["q"], x["centroids"]),
    "routing.route": lambda ns, x: ns.route(x["similarities"], W, key_padding_mask=x["mask"]),
    "routing.cluster_attention": lambda ns, x: ns.cluster_attention(x["q"], x["k"], x["v"], x["members"],
                                                                    x["members"]),
    "routing.cluster_attention_vjp": lambda ns, x: ns.cluster_attention_vjp(x["q"], x["k"], x["v"], x["members"],
                                                                            x["members"], x["o"]),
    "routing.combine": lambda ns, x: ns.combine(x["o"], x["members"], L),
    "routing.local_attention": lambda ns, x: ns.local_attention(x["q"], x["k"], x["v"], W, key_padding_mask=x["mask"]),
    "routing.local_attention_vjp": lambda ns, x: ns.local_attention_vjp(x["q"], x["k"], x["v"], W, x["dout"],
                                                                        causal=True, key_padding_mask=x["mask"]),
    "routing.assign": lambda ns, x: ns.assign(x["q"], x["centroids"]),
    "routing.commitment_loss_vjp": lambda ns, x: ns.commitment_loss_vjp(x["q"], x["centroids"]),
    "routing.attention": lambda ns, x: ns.attention(x["q"], x["k"], x["v"], x["centroids"], window=W,
                                                    key_padding_mask=x["mask"]),
    "routing.attention_vjp": lambda ns, x: ns.attention_vjp(x["q"], x["k"], x["v"], x["centroids"], x["dout"],
                                                            window=W, key_padding_mask=x["mask"]),
}


SLACK = 32 * 1024  # Python objects: the emulated launches' argument cells and 4 KiB error buffers, ...


def _inputs(dtype):
    return {name: value.astype(dtype) if value.dtype.kind == "f" else value for name, value in X.items()}


def _measured_peak(call, namespace, inputs):
    """The peak of NumPy allocations during ``call`` beyond what existed before it (the inputs)."""
    call(namespace, inputs)  # compiles, and fills caches, outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        call(namespace, inputs)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_the_cluster_logits_chunk_of_the_reference_is_the_one_planned():
    """C·W² above memory.CLUSTER_LOGITS: the reference's core then takes clusters in chunks, as planned."""
    batch, heads, length, dim, clusters, window = 1, 1, 512, 4, 96, 256
    assert clusters * window**2 > memory.CLUSTER_LOGITS
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((batch, heads, length, dim)) for _ in range(3))
    members = np.sort(np.stack([rng.permutation(length)[:window] for _ in range(clusters)]), axis=-1)[None, None]
    measured = _measured_peak(lambda ns, x: ns.cluster_attention(q, k, v, members, members), routing, None)
    planned = _plan(Shape(batch, heads, length, dim, dim, clusters=clusters, window=window), "float64",
                    "routing.cluster_attention").peak_bytes
    assert measured <= planned < 2 * measured


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CALLS)
def test_the_measured_peak_stays_within_the_plan(monkeypatch, name, dtype):
    monkeypatch.setattr(memory, "CHUNK_BYTES", 40_000)  # several groups of heads, and windows of blocks
    namespace = fsat if name.startswith("fsat") else routing
    measured = _measured_peak(CALLS[name], namespace, _inputs(dtype))
    planned = _plan(Shape(B, H, L, D, DV, top_k=K, clusters=C, window=W), dtype, name).peak_bytes
    # The plans leave out Python's objects (SLACK) and the validation's (B, H, K)-sized index temporaries.
    assert measured <= planned + SLACK, f"{name}: measured {measured} B > planned {planned} B + {SLACK} B"


def _sequences(batch, heads, length, dim, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, heads, length, dim)) for _ in range(4)]


def test_the_local_attention_no_longer_forms_the_logits_of_every_block(monkeypatch):
    """Regression: the local attention formed (B, H, L/W, W, 3W) logits (and as large weights and masks)."""
    batch, heads, length, dim, block = 1, 2, 2048, 4, 32
    q, k, v, dout = _sequences(batch, heads, length, dim)
    monkeypatch.setattr(memory, "CHUNK_BYTES", 6 * memory.local_block(block, dim, dim, 8))  # windows of 6 blocks
    peak = _measured_peak(lambda ns, x: ns.local_attention_vjp(q, k, v, block, dout, causal=True), routing, None)
    gradients = 3 * batch * heads * length * dim * 8
    logits = batch * heads * (length // block) * block * 3 * block * 8
    assert peak - gradients < logits / 2


def test_the_routing_no_longer_sorts_the_similarities_of_every_head():
    """Regression: route argsorted all B·H·C·L similarities (int64 indices, and a copy of the scores)."""
    batch, heads, length, clusters, window = 8, 8, 256, 16, 32
    scores = np.random.default_rng(6).standard_normal((batch, heads, length, clusters))
    peak = _measured_peak(lambda ns, x: ns.route(scores, window), routing, None)
    members = batch * heads * clusters * window * 8
    assert peak - members < batch * heads * clusters * length * 8 / 4


def test_the_cluster_gradient_no_longer_adds_full_buffers_per_cluster(monkeypatch):
    """Regression: the cluster attention's gradient scattered every chunk of clusters into (B, H, L, D)
    buffers of all heads (one cluster per chunk at realistic sizes, so C full buffers per gradient)."""
    batch, heads, length, dim, clusters, window = 2, 4, 64, 4, 8, 16
    q, k, v, _ = _sequences(batch, heads, length, dim)
    rng = np.random.default_rng(7)
    members = np.sort(np.stack([rng.permutation(length)[:window] for _ in range(batch * heads * clusters)]),
                      axis=-1).reshape(batch, heads, clusters, window)
    do = rng.standard_normal((batch, heads, clusters, window, dim))
    reference = importlib.import_module("refattn.routing.cluster_attention")
    scattered, original = [], reference.scatter_add
    monkeypatch.setattr(reference, "scatter_add", lambda values, members, length: scattered.append(
        members.shape[:2]) or original(values, members, length))
    monkeypatch.setattr(memory, "CHUNK_BYTES", memory.cluster_head(length, dim, dim, clusters, window, 8,
                                                                   gradient=True))  # one head per group
    routing.cluster_attention_vjp(q, k, v, members, members, do)
    assert len(scattered) == 3 * batch * heads  # three gradients per group: every cluster of a head in one chunk
    assert {b * h for b, h in scattered} == {1}  # buffers of one head, never of every head


@pytest.mark.parametrize("name", CALLS)
def test_one_head_per_chunk_gives_the_reference_results(monkeypatch, name):
    monkeypatch.setattr(memory, "CHUNK_BYTES", 1)  # one head per group, one block per window
    x = _inputs("float64")
    actual = CALLS[name](fsat if name.startswith("fsat") else routing, x)
    expected = CALLS[name](ref_fsat if name.startswith("fsat") else ref_routing, x)
    actual, expected = (r if isinstance(r, tuple) else (r,) for r in (actual, expected))
    for got, want in zip(actual, expected, strict=True):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
