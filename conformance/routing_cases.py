"""The Routing checks: every function of the ``routing`` namespace, forward and VJP, over a grid of cases.

Shapes keep B, H >= 2 and include L = 1, small primes and a power of two, odd D and Dv != D, with
C·W above L (tokens in several clusters) and below it (tokens in none). Flags cover both profiles,
causal or not, shared or unshared QK (the lucidrains profile's causal unshared configuration is
rejected by design and has no check), and padding. Inputs whose routing is not tie-free by the
dtype's margin are replaced by the next seed. ``init_centroids`` has no check: it draws from a
backend-specific generator, so its numbers are not comparable across backends.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn.conformance import tolerances
from refattn.conformance.checks import Check, Inputs, padding, seed_for
from refattn.conformance.gradcheck import numerical_vjp
from refattn.conformance.oracles import routing as oracle

# (B, H, L, D, Dv, C, W)
SHAPES = [(2, 2, 1, 3, 3, 2, 1), (2, 2, 5, 3, 2, 2, 3), (2, 2, 7, 5, 5, 3, 2), (2, 3, 8, 4, 6, 3, 4)]
QUICK_SHAPES = SHAPES[:2]
GRADIENT_SHAPES = SHAPES[:3]
PROFILES = ("tacl", "lucidrains")
BLOCK = 3


def _label(shape: tuple[int, ...], **flags: Any) -> str:
    batch, heads, length, dim, dim_v, clusters, window = shape
    words = [name if value is True else f"{value}" for name, value in flags.items() if value]
    return f"B{batch} H{heads} L{length} D{dim} Dv{dim_v} C{clusters} W{window}" + "".join(f" {w}" for w in words)



def _route_tie_free(similarities: np.ndarray, window: int, mask: np.ndarray | None, dtype: str) -> bool:
    """Per centroid, the W-th and (W+1)-th largest similarities of unpadded tokens differ by the margin."""
    s = np.moveaxis(similarities, 2, -1)  # (B, H, C, L)
    if mask is not None:
        s = np.where(mask[:, None, None, :], -np.inf, s)
    ordered = -np.sort(-s, axis=-1)
    if window >= ordered.shape[-1]:
        return True
    above, below = ordered[..., window - 1], ordered[..., window]
    margin = tolerances.decision_margin(above, dtype)
    return bool(np.all(np.isneginf(below) | np.isneginf(above) | (above - below > margin)))


def _assign_tie_free(similarities: np.ndarray, dtype: str) -> bool:
    if similarities.shape[-1] < 2:
        return True
    ordered = -np.sort(-similarities, axis=-1)
    return bool(np.all(ordered[..., 0] - ordered[..., 1] > tolerances.decision_margin(ordered[..., 0], dtype)))


def _similarities(x: np.ndarray, centroids: np.ndarray, profile: str) -> np.ndarray:
    return np.einsum("bhld,hcd->bhlc", oracle.normalize(x, profile), centroids)


def _inputs(shape, dtype, profile, causal, shared, padded, function) -> Inputs:
    """Random q, k, v, centroids and cotangent with tie-free routing (and assignment), by seed search."""
    batch, heads, length, dim, dim_v, clusters, window = shape
    for attempt in range(500):
        rng = np.random.default_rng(seed_for("routing", function, shape, profile, causal, shared, padded, attempt))
        x: Inputs = {
            "q": rng.standard_normal((batch, heads, length, dim)),
            "k": None if shared else rng.standard_normal((batch, heads, length, dim)),
            "v": rng.standard_normal((batch, heads, length, dim_v)),
            "centroids": rng.standard_normal((heads, clusters, dim)),
            "mask": padding(rng, batch, length) if padded else None,
            "dout": rng.standard_normal((batch, heads, length, dim_v)),
        }
        routed = [x["q"]] + ([] if shared else [x["k"]])
        similarities = [_similarities(y, x["centroids"], profile) for y in routed]
        if all(_route_tie_free(s, window, x["mask"], dtype) and _assign_tie_free(s, dtype) for s in similarities):
            return x
    raise RuntimeError(f"no tie-free seed for routing.{function} {shape}")


def _configurations(shapes) -> Iterator[tuple]:
    for shape, profile, causal, shared, padded in itertools.product(shapes, PROFILES, *[(False, True)] * 3):
        if profile == "lucidrains" and causal and not shared:
            continue  # rejected: lucidrains adds learned memory key/values there (spec/routing.md)
        yield shape, profile, causal, shared, padded


def _attention_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, profile, causal, shared, padded in _configurations(shapes):
        window = shape[6]
        label = _label(shape, profile=profile, causal=causal, shared=shared, padded=padded)
        x = _inputs(shape, dtype, profile, causal, shared, padded, "attention")
        options = dict(window=window, causal=causal, shared_qk=shared, profile=profile)
        yield Check("routing", "attention", label, dtype, x, oracle_kind="naive brute force",
                    call=lambda ns, x, o=options: ns.attention(x["q"], x["k"], x["v"], x["centroids"],
                                                               key_padding_mask=x["mask"], **o),
                    oracle=lambda x, o=options: oracle.attention(x["q"], x["k"], x["v"], x["centroids"],
                                                                 key_padding_mask=x["mask"], **o))
        members = _members(x, window, profile, shared)
        yield Check("routing", "cluster_attention+combine", label, dtype, dict(x, **members),
                    oracle_kind="naive brute force",
                    call=lambda ns, x, o=options: ns.combine(
                        ns.cluster_attention(x["q"], x["k"], x["v"], x["qm"], x["km"], causal=o["causal"],
                                             shared_qk=o["shared_qk"], profile=o["profile"]),
                        x["qm"], x["q"].shape[2], profile=o["profile"]),
                    oracle=lambda x, o=options: oracle.routed_attention(
                        x["q"], x["k"], x["v"], x["qm"], x["km"], causal=o["causal"], shared_qk=o["shared_qk"],
                        profile=o["profile"]))
        if shape not in gradient_shapes:
            continue
        yield Check("routing", "attention_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                    call=lambda ns, x, o=options: tuple(ns.attention_vjp(x["q"], x["k"], x["v"], x["centroids"],
                                                                         x["dout"], key_padding_mask=x["mask"], **o)),
                    oracle=lambda x, o=options: _attention_differences(x, o))
        yield Check("routing", "cluster_attention_vjp+combine_vjp", label, dtype, dict(x, **members), gradient=True,
                    oracle_kind="finite differences",
                    call=lambda ns, x, o=options: tuple(ns.cluster_attention_vjp(
                        x["q"], x["k"], x["v"], x["qm"], x["km"], ns.combine_vjp(x["qm"], x["dout"],
                                                                                 profile=o["profile"]),
                        causal=o["causal"], shared_qk=o["shared_qk"], profile=o["profile"])),
                    oracle=lambda x, o=options: _routed_differences(x, o))


def _members(x: Inputs, window: int, profile: str, shared: bool) -> dict[str, np.ndarray]:
    """Members from the naive route, so that the cluster checks do not depend on the routing under test."""
    qm = oracle.route(_similarities(x["q"], x["centroids"], profile), window, x["mask"])
    km = qm if shared else oracle.route(_similarities(x["k"], x["centroids"], profile), window, x["mask"])
    return {"qm": qm, "km": km}


def _attention_differences(x: Inputs, options: dict[str, Any]) -> tuple[np.ndarray | None, ...]:
    shared = options["shared_qk"]

    def forward(q, v, *k):
        return oracle.attention(q, k[0] if k else None, v, x["centroids"], key_padding_mask=x["mask"], **options)

    dq, dv, *dk = numerical_vjp(forward, (x["q"], x["v"]) + (() if shared else (x["k"],)), x["dout"])
    return dq, (None if shared else dk[0]), dv


def _routed_differences(x: Inputs, options: dict[str, Any]) -> tuple[np.ndarray | None, ...]:
    shared = options["shared_qk"]
    kwargs = dict(causal=options["causal"], shared_qk=shared, profile=options["profile"])

    def forward(q, v, *k):
        return oracle.routed_attention(q, k[0] if k else None, v, x["qm"], x["km"], **kwargs)

    dq, dv, *dk = numerical_vjp(forward, (x["q"], x["v"]) + (() if shared else (x["k"],)), x["dout"])
    return dq, (None if shared else dk[0]), dv


def _naive_combine(o: np.ndarray, members: np.ndarray, length: int, profile: str) -> np.ndarray:
    eps = {"tacl": 1e-2, "lucidrains": 1e-5}[profile]  # spec/routing.md, step 5
    batch, heads, clusters, window, dim_v = o.shape
    total = np.zeros((batch, heads, length, dim_v))
    count = np.zeros((batch, heads, length))
    for b, h, c, w in itertools.product(range(batch), range(heads), range(clusters), range(window)):
        t = members[b, h, c, w]
        if t >= 0:
            total[b, h, t] += o[b, h, c, w]
            count[b, h, t] += 1
    return total / (count[..., None] + eps)


def _step_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, profile, padded in itertools.product(shapes, PROFILES, (False, True)):
        batch, heads, length, dim, dim_v, clusters, window = shape
        label = _label(shape, profile=profile, padded=padded)
        x = _inputs(shape, dtype, profile, False, False, padded, "steps")
        x_hat = oracle.normalize(x["q"], profile)
        members = _members(x, window, profile, False)
        rng = np.random.default_rng(seed_for("routing steps", shape, profile, padded))
        x = dict(x, x_hat=x_hat, qm=members["qm"], o=rng.standard_normal((batch, heads, clusters, window, dim_v)),
                 dx=rng.standard_normal(x["q"].shape), ds=rng.standard_normal((batch, heads, length, clusters)))
        wants_gradient = shape in gradient_shapes
        yield Check("routing", "normalize", label, dtype, x, oracle_kind="naive loops",
                    call=lambda ns, x, p=profile: ns.normalize(x["q"], profile=p),
                    oracle=lambda x, p=profile: oracle.normalize(x["q"], p))
        if wants_gradient:
            yield Check("routing", "normalize_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                        call=lambda ns, x, p=profile: ns.normalize_vjp(x["q"], x["dx"], profile=p),
                        oracle=lambda x, p=profile: numerical_vjp(lambda q: oracle.normalize(q, p), (x["q"],), x["dx"]))
        yield Check("routing", "route", label, dtype, x, discrete=frozenset({0}), oracle_kind="naive sort",
                    call=lambda ns, x, p=profile, w=window: ns.route(
                        ns.similarity(ns.normalize(x["q"], profile=p), x["centroids"]), w, key_padding_mask=x["mask"]),
                    oracle=lambda x, w=window: (x["qm"],))
        yield Check("routing", "assign", label, dtype, x, discrete=frozenset({0}), oracle_kind="naive argmax",
                    call=lambda ns, x: ns.assign(x["x_hat"], x["centroids"], key_padding_mask=x["mask"]),
                    oracle=lambda x: oracle.assign(x["x_hat"], x["centroids"], x["mask"]))
        yield Check("routing", "combine", label, dtype, x, oracle_kind="naive loops",
                    call=lambda ns, x, p=profile, n=length: ns.combine(x["o"], x["qm"], n, profile=p),
                    oracle=lambda x, p=profile, n=length: _naive_combine(x["o"], x["qm"], n, p))
        yield Check("routing", "commitment_loss", label, dtype, x, oracle_kind="naive loops",
                    call=lambda ns, x: np.asarray(ns.commitment_loss(x["x_hat"], x["centroids"],
                                                                     key_padding_mask=x["mask"])),
                    oracle=lambda x: np.asarray(oracle.commitment_loss(x["x_hat"], x["centroids"],
                                                                       key_padding_mask=x["mask"])))
        for shared in (False, True):
            yield Check("routing", "update_centroids", label + (" shared" if shared else ""), dtype,
                        dict(x, counts=rng.uniform(0.5, 2.0, (heads, clusters)),
                             sums=rng.standard_normal((heads, clusters, dim)),
                             k_hat=None if shared else oracle.normalize(x["k"], profile)),
                        oracle_kind="naive loops",
                        call=lambda ns, x, p=profile: tuple(ns.update_centroids(
                            ns.CentroidState(x["centroids"], x["counts"], x["sums"]), x["x_hat"], x["k_hat"],
                            profile=p, key_padding_mask=x["mask"], decay=0.9)),
                        oracle=lambda x, p=profile: oracle.update_centroids(
                            x["centroids"], x["counts"], x["sums"], x["x_hat"], x["k_hat"], profile=p,
                            key_padding_mask=x["mask"], decay=0.9))
        if profile == "tacl":  # similarity does not depend on the profile
            yield Check("routing", "similarity", label, dtype, x, oracle_kind="naive loops",
                        call=lambda ns, x: ns.similarity(x["x_hat"], x["centroids"]),
                        oracle=lambda x: _naive_similarity(x["x_hat"], x["centroids"]))
        if not wants_gradient:
            continue
        yield Check("routing", "combine_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                    call=lambda ns, x, p=profile: ns.combine_vjp(x["qm"], x["dx"][..., :x["o"].shape[4]], profile=p),
                    oracle=lambda x, p=profile, n=length: numerical_vjp(
                        lambda o: _naive_combine(o, x["qm"], n, p), (x["o"],), x["dx"][..., :x["o"].shape[4]]))
        yield Check("routing", "commitment_loss_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                    call=lambda ns, x: ns.commitment_loss_vjp(x["x_hat"], x["centroids"], 1.0,
                                                              key_padding_mask=x["mask"]),
                    oracle=lambda x: numerical_vjp(
                        lambda y: np.asarray(oracle.commitment_loss(y, x["centroids"], key_padding_mask=x["mask"])),
                        (x["x_hat"],), np.asarray(1.0)))
        if profile == "tacl":
            yield Check("routing", "similarity_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                        call=lambda ns, x: tuple(ns.similarity_vjp(x["x_hat"], x["centroids"], x["ds"])),
                        oracle=lambda x: numerical_vjp(_naive_similarity, (x["x_hat"], x["centroids"]), x["ds"]))


def _naive_similarity(x_hat: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """S[b, h, t, c] = Σ_d x̂[b, h, t, d] μ[h, c, d], as an explicit sum over d."""
    return sum(x_hat[..., None, d] * centroids[None, :, None, :, d] for d in range(x_hat.shape[-1]))


def _local_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, causal, padded in itertools.product(shapes, (False, True), (False, True)):
        label = _label(shape, causal=causal, padded=padded) + f" block{BLOCK}"
        x = _inputs(shape, dtype, "tacl", causal, False, padded, "local")
        options = dict(causal=causal)
        yield Check("routing", "local_attention", label, dtype, x, oracle_kind="naive O(L^2)",
                    call=lambda ns, x, o=options: ns.local_attention(x["q"], x["k"], x["v"], BLOCK,
                                                                     key_padding_mask=x["mask"], **o),
                    oracle=lambda x, o=options: oracle.local_attention(x["q"], x["k"], x["v"], BLOCK,
                                                                       key_padding_mask=x["mask"], **o))
        if shape not in gradient_shapes:
            continue
        yield Check("routing", "local_attention_vjp", label, dtype, x, gradient=True, oracle_kind="finite differences",
                    call=lambda ns, x, o=options: tuple(ns.local_attention_vjp(
                        x["q"], x["k"], x["v"], BLOCK, x["dout"], key_padding_mask=x["mask"], **o)),
                    oracle=lambda x, o=options: numerical_vjp(
                        lambda q, k, v: oracle.local_attention(q, k, v, BLOCK, key_padding_mask=x["mask"], **o),
                        (x["q"], x["k"], x["v"]), x["dout"]))


def checks(dtype: str, *, quick: bool = False) -> Iterator[Check]:
    """Every Routing check for one dtype; ``quick`` keeps the two smallest shapes."""
    shapes = QUICK_SHAPES if quick else SHAPES
    gradient_shapes = [shape for shape in shapes if shape in GRADIENT_SHAPES]
    yield from _step_checks(shapes, gradient_shapes, dtype)
    yield from _local_checks(shapes, gradient_shapes, dtype)
    yield from _attention_checks(shapes, gradient_shapes, dtype)
