"""The Routing checks: every function of the ``routing`` namespace, forward, VJP and autograd, over a grid of cases.

The grid has the four parts of :data:`refattn.conformance.checks.PARTS`:

- ``base``: shapes with B, H >= 2, L = 1, small primes and a power of two, odd D and Dv != D, C·W
  above L (tokens in several clusters) and below it (tokens in none); both profiles, causal or not,
  shared or unshared QK (the lucidrains profile's causal unshared configuration is rejected by
  design and has no check), padding. Local attention uses blocks of 2, so that L = 5 already has
  three blocks. The quick grid takes the two smallest shapes and, of the attention configurations, a
  pairwise covering. Inputs whose routing is not tie-free by the dtype's margin, judged on the inputs
  rounded to the dtype, are replaced by the next seed.
- ``ties``: ``route`` on integer similarities (padded, with slots left empty) and ``assign``,
  ``commitment_loss`` and ``update_centroids`` on integer tokens and centroids, where the tie rules
  of spec/interface.md decide.
- ``extreme``: the lucidrains profile's shared-QK self logit of -5e4 against other logits of -5e4
  (built exactly, so that it decides the output), features near 3e4 (float16 squares overflow) and
  logits near 100; in float64, q and k whose logits overflow to NaN or +inf for one query, in local
  attention (next to padded rows) and in cluster attention's lucidrains profile, which must raise the
  reference's overflow error (an error check).
- ``large`` (full grid only): L = 64, D = 32, where accumulating in half precision shows; the
  reference's gradients are checked there along a random direction.

``init_centroids`` has no check: it draws from a backend-specific generator, so its numbers are not
comparable across backends. Each differentiable function is also differentiated through the
backend's autograd (``<function>:autodiff``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn.conformance import tolerances
from refattn.conformance.checks import Autodiff, Check, Inputs, nan_rows, overflow_error, overflowing, padding, seed_for
from refattn.conformance.gradcheck import Projection, directional_vjp, numerical_vjp
from refattn.conformance.oracles import routing as oracle
from refattn.routing.cluster_attention import OVERFLOWS as CLUSTER_OVERFLOWS
from refattn.routing.local_attention import OVERFLOWS as LOCAL_OVERFLOWS

# (B, H, L, D, Dv, C, W)
SHAPES = [(2, 2, 1, 3, 3, 2, 1), (2, 2, 5, 3, 2, 2, 3), (2, 2, 7, 5, 5, 3, 2), (2, 3, 8, 4, 6, 3, 4)]
QUICK_SHAPES = SHAPES[:2]
GRADIENT_SHAPES = SHAPES[:3]
LARGE_SHAPE = (2, 2, 64, 32, 16, 4, 16)
PROFILES = ("tacl", "lucidrains")
BLOCK = 2
LARGE_BLOCK = 8
DLOSS = 0.75  # the commitment loss's cotangent: not 1, so that a VJP that ignores it is seen
# The quick grid's attention configurations (profile, causal, shared, padded): every two of the four
# meet in every combination the profiles allow.
QUICK_CONFIGURATIONS = [("tacl", False, False, False), ("tacl", True, True, True), ("lucidrains", False, True, True),
                        ("lucidrains", False, False, True), ("lucidrains", True, True, False),
                        ("tacl", True, False, True)]


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


def _inputs(shape, dtype, profile, causal, shared, padded, function, scale=1.0) -> Inputs:
    """Random q, k, v, centroids and cotangent with tie-free routing (and assignment) in ``dtype``, by seed search."""
    batch, heads, length, dim, dim_v, clusters, window = shape
    for attempt in range(500):
        rng = np.random.default_rng(seed_for("routing", function, shape, profile, causal, shared, padded, attempt))
        x: Inputs = {
            "q": scale * rng.standard_normal((batch, heads, length, dim)),
            "k": None if shared else scale * rng.standard_normal((batch, heads, length, dim)),
            "v": rng.standard_normal((batch, heads, length, dim_v)),
            "centroids": rng.standard_normal((heads, clusters, dim)),
            "mask": padding(rng, batch, length) if padded else None,
            "dout": rng.standard_normal((batch, heads, length, dim_v)),
        }
        centroids = tolerances.round_to(x["centroids"], dtype)
        routed = [x["q"]] + ([] if shared else [x["k"]])
        similarities = [_similarities(tolerances.round_to(y, dtype), centroids, profile) for y in routed]
        if all(_route_tie_free(s, window, x["mask"], dtype) and _assign_tie_free(s, dtype) for s in similarities):
            return x
    raise RuntimeError(f"no tie-free seed for routing.{function} {shape}")


def _step(x: np.ndarray) -> float:
    """A finite-difference step relative to the inputs' magnitude (1e-6 for inputs of order one)."""
    return 1e-6 * max(1.0, float(np.abs(x).max(initial=0.0)))


def _gradient_oracle(f, inputs, cotangent, directional: bool, words: str):
    if directional:
        return directional_vjp(f, inputs, cotangent, np.random.default_rng(seed_for("direction", words)))
    return numerical_vjp(f, inputs, cotangent, eps=_step(inputs[0]))


def _kind(directional: bool) -> str:
    return "directional finite differences" if directional else "finite differences"


def _without_none(grads: Any) -> tuple[Any, ...]:
    return tuple(g for g in grads if g is not None)


# --------------------------------------------------------------------------------------------
# the pipeline and the cluster attention
# --------------------------------------------------------------------------------------------


def _configurations(shapes, quick) -> Iterator[tuple]:
    if quick:
        yield from ((shape, *configuration) for shape in shapes for configuration in QUICK_CONFIGURATIONS)
        return
    for shape, profile, causal, shared, padded in itertools.product(shapes, PROFILES, *[(False, True)] * 3):
        if profile == "lucidrains" and causal and not shared:
            continue  # rejected: lucidrains adds learned memory key/values there (spec/routing.md)
        yield shape, profile, causal, shared, padded


def _members(x: Inputs, window: int, profile: str, shared: bool) -> dict[str, np.ndarray]:
    """Members from the naive route, so that the cluster checks do not depend on the routing under test."""
    qm = oracle.route(_similarities(x["q"], x["centroids"], profile), window, x["mask"])
    km = qm if shared else oracle.route(_similarities(x["k"], x["centroids"], profile), window, x["mask"])
    return {"qm": qm, "km": km}


def _attention_forward(ns, x, o):
    return ns.attention(x["q"], x["k"], x["v"], x["centroids"], key_padding_mask=x["mask"], **o)


def _attention_vjp(ns, x, o):
    return tuple(ns.attention_vjp(x["q"], x["k"], x["v"], x["centroids"], x["dout"], key_padding_mask=x["mask"], **o))


def _cluster_forward(ns, x, o):
    return ns.cluster_attention(x["q"], x["k"], x["v"], x["qm"], x["km"], causal=o["causal"], shared_qk=o["shared_qk"],
                                profile=o["profile"])


def _cluster_vjp(ns, x, o, do):
    return tuple(ns.cluster_attention_vjp(x["q"], x["k"], x["v"], x["qm"], x["km"], do, causal=o["causal"],
                                          shared_qk=o["shared_qk"], profile=o["profile"]))


def _attention_differences(x: Inputs, options: dict[str, Any], directional: bool):
    """Finite differences of the naive pipeline, as (dq, dk, dv), dk None when shared."""
    shared = options["shared_qk"]

    def forward(q, v, *k):
        return oracle.attention(q, k[0] if k else None, v, x["centroids"], key_padding_mask=x["mask"], **options)

    return _reordered(forward, x, shared, x["dout"], directional, "attention")


def _cluster_differences(x: Inputs, options: dict[str, Any], directional: bool):
    """Finite differences of the naive cluster attention on the given members, as (dq, dk, dv)."""
    shared = options["shared_qk"]
    kwargs = dict(causal=options["causal"], shared_qk=shared, profile=options["profile"])

    def forward(q, v, *k):
        return oracle.cluster_attention(q, k[0] if k else None, v, x["qm"], x["km"], **kwargs)

    return _reordered(forward, x, shared, x["do"], directional, "cluster attention")


def _reordered(forward, x: Inputs, shared: bool, cotangent: np.ndarray, directional: bool, words: str):
    """The gradient oracle of ``forward(q, v, *k)`` in (q, k, v) order (k None when shared, and then
    left out of a projection)."""
    inputs = (x["q"], x["v"]) + (() if shared else (x["k"],))
    if directional:
        projection = _gradient_oracle(forward, inputs, cotangent, True, words)
        d = projection.directions
        return Projection((d[0], d[1]) if shared else (d[0], d[2], d[1]), projection.value)
    dq, dv, *dk = _gradient_oracle(forward, inputs, cotangent, False, words)
    return dq, (None if shared else dk[0]), dv


def _attention_case_checks(shape, profile, causal, shared, padded, dtype, part, x, with_gradients,
                           forward_only=False) -> Iterator[Check]:
    """``attention`` and ``cluster_attention`` (on the naive route's members) on one case, with
    gradients and autograd."""
    window = shape[6]
    label = _label(shape, profile=profile, causal=causal, shared=shared, padded=padded)
    options = dict(window=window, causal=causal, shared_qk=shared, profile=profile)
    kwargs = dict(causal=causal, shared_qk=shared, profile=profile)
    yield Check("routing", "attention", label, dtype, x, oracle_kind="naive brute force", part=part,
                call=lambda ns, x, o=options: _attention_forward(ns, x, o),
                oracle=lambda x, o=options: oracle.attention(x["q"], x["k"], x["v"], x["centroids"],
                                                             key_padding_mask=x["mask"], **o))
    x = dict(x, **_members(x, window, profile, shared))
    rng = np.random.default_rng(seed_for("routing do", label, part))
    x["do"] = rng.standard_normal(x["qm"].shape + (x["v"].shape[3],))
    yield Check("routing", "cluster_attention", label, dtype, x, oracle_kind="naive loops", part=part,
                call=lambda ns, x, o=options: _cluster_forward(ns, x, o),
                oracle=lambda x, a=kwargs: oracle.cluster_attention(x["q"], x["k"], x["v"], x["qm"], x["km"], **a))
    if forward_only or not with_gradients:
        return
    directional = part == "large"
    wrt = ("q", "v") if shared else ("q", "k", "v")
    yield Check("routing", "attention_vjp", label, dtype, x, gradient=True, oracle_kind=_kind(directional), part=part,
                call=lambda ns, x, o=options: _attention_vjp(ns, x, o),
                oracle=lambda x, o=options: _attention_differences(x, o, directional))
    yield Check("routing", "attention:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, o=options: _attention_forward(ns, x, o),
                autodiff=Autodiff(wrt, ("dout",), lambda ns, x, o=options: _without_none(_attention_vjp(ns, x, o))))
    yield Check("routing", "cluster_attention_vjp", label, dtype, x, gradient=True, part=part,
                oracle_kind=_kind(directional), call=lambda ns, x, o=options: _cluster_vjp(ns, x, o, x["do"]),
                oracle=lambda x, o=options: _cluster_differences(x, o, directional))
    yield Check("routing", "cluster_attention:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, o=options: _cluster_forward(ns, x, o),
                autodiff=Autodiff(wrt, ("do",),
                                  lambda ns, x, o=options: _without_none(_cluster_vjp(ns, x, o, x["do"]))))


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


def _naive_similarity(x_hat: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """S[b, h, t, c] = Σ_d x̂[b, h, t, d] μ[h, c, d], as an explicit sum over d."""
    return sum(x_hat[..., None, d] * centroids[None, :, None, :, d] for d in range(x_hat.shape[-1]))


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


def _naive_commitment_gradient(x: Inputs) -> np.ndarray:
    """dloss · 2β (x̂ − μ_a) / (N D) at the unpadded tokens, a the naive assignment (ties included)."""
    x_hat, centroids = x["x_hat"], x["centroids"]
    labels = oracle.assign(x_hat, centroids, x["mask"])
    grad = np.zeros_like(x_hat)
    count = int(np.count_nonzero(labels >= 0)) * x_hat.shape[3]
    for b, h, t in np.ndindex(labels.shape):
        if labels[b, h, t] >= 0:
            grad[b, h, t] = DLOSS * 2e-4 * (x_hat[b, h, t] - centroids[h, labels[b, h, t]]) / count
    return grad


def _commitment_checks(label, dtype, x, part, with_gradients, gradient_oracle) -> Iterator[Check]:
    yield Check("routing", "commitment_loss", label, dtype, x, oracle_kind="naive loops", part=part,
                accumulated=frozenset({0}),
                call=lambda ns, x: ns.commitment_loss(x["x_hat"], x["centroids"], key_padding_mask=x["mask"]),
                oracle=lambda x: np.asarray(oracle.commitment_loss(x["x_hat"], x["centroids"],
                                                                   key_padding_mask=x["mask"])))
    if not with_gradients:
        return

    def vjp(ns, x):
        return ns.commitment_loss_vjp(x["x_hat"], x["centroids"], DLOSS, key_padding_mask=x["mask"])

    kind = "naive formula" if gradient_oracle is _naive_commitment_gradient else "finite differences"
    yield Check("routing", "commitment_loss_vjp", label, dtype, x, gradient=True, oracle_kind=kind, part=part,
                call=vjp, oracle=gradient_oracle)
    yield Check("routing", "commitment_loss:autodiff", label, dtype, dict(x, dloss=np.asarray(DLOSS)), gradient=True,
                part=part, autodiff=Autodiff(("x_hat",), ("dloss",), vjp),
                call=lambda ns, x: ns.commitment_loss(x["x_hat"], x["centroids"], key_padding_mask=x["mask"]))


def _update_checks(label, dtype, x, profile, rng, part) -> Iterator[Check]:
    heads, clusters, dim = x["centroids"].shape
    for shared in (False, True):
        yield Check("routing", "update_centroids", label + (" shared" if shared else ""), dtype,
                    dict(x, counts=rng.uniform(0.5, 2.0, (heads, clusters)),
                         sums=rng.standard_normal((heads, clusters, dim)),
                         k_hat=None if shared else x["k_hat"]),
                    oracle_kind="naive loops", part=part,
                    call=lambda ns, x, p=profile: tuple(ns.update_centroids(
                        ns.CentroidState(x["centroids"], x["counts"], x["sums"]), x["x_hat"], x["k_hat"],
                        profile=p, key_padding_mask=x["mask"], decay=0.9)),
                    oracle=lambda x, p=profile: oracle.update_centroids(
                        x["centroids"], x["counts"], x["sums"], x["x_hat"], x["k_hat"], profile=p,
                        key_padding_mask=x["mask"], decay=0.9))


def _step_inputs(shape, dtype, profile, padded, part, scale=1.0) -> Inputs:
    """q and k, their normalizations x̂ and k̂, centroids and the similarities S = x̂ μᵀ, with every
    decision the steps take tie-free in ``dtype``: route on S as the backend holds it (rounded),
    assignment of x̂ and k̂ (rounded) to the centroids (rounded). Plus cotangents and slot outputs."""
    batch, heads, length, dim, dim_v, clusters, window = shape
    for attempt in range(500):
        rng = np.random.default_rng(seed_for("routing steps", shape, profile, padded, part, attempt))
        x: Inputs = {"q": scale * rng.standard_normal((batch, heads, length, dim)),
                     "k": scale * rng.standard_normal((batch, heads, length, dim)),
                     "centroids": rng.standard_normal((heads, clusters, dim)),
                     "mask": padding(rng, batch, length) if padded else None}
        x["x_hat"], x["k_hat"] = oracle.normalize(x["q"], profile), oracle.normalize(x["k"], profile)
        x["s"] = _naive_similarity(x["x_hat"], x["centroids"])
        centroids = tolerances.round_to(x["centroids"], dtype)
        assigned = [_naive_similarity(tolerances.round_to(y, dtype), centroids) for y in (x["x_hat"], x["k_hat"])]
        if _route_tie_free(tolerances.round_to(x["s"], dtype), window, x["mask"], dtype) and \
                all(_assign_tie_free(s, dtype) for s in assigned):
            x["qm"] = oracle.route(x["s"], window, x["mask"])
            x["o"] = rng.standard_normal((batch, heads, clusters, window, dim_v))
            x["dx"] = rng.standard_normal(x["q"].shape)
            x["ds"] = rng.standard_normal((batch, heads, length, clusters))
            x["dcombined"] = x["dx"][..., :dim_v]
            return x
    raise RuntimeError(f"no tie-free seed for the routing steps {shape}")


def _step_case_checks(shape, profile, padded, dtype, part, x, with_gradients) -> Iterator[Check]:
    batch, heads, length, dim, dim_v, clusters, window = shape
    label = _label(shape, profile=profile, padded=padded)
    directional = part == "large"
    kind = _kind(directional)
    rng = np.random.default_rng(seed_for("routing state", shape, profile, padded, part))

    def normalize_vjp(ns, x, p=profile):
        return ns.normalize_vjp(x["q"], x["dx"], profile=p)

    yield Check("routing", "normalize", label, dtype, x, oracle_kind="naive loops", part=part,
                call=lambda ns, x, p=profile: ns.normalize(x["q"], profile=p),
                oracle=lambda x, p=profile: oracle.normalize(x["q"], p))
    if with_gradients:
        normalize_oracle = lambda x, p=profile: _gradient_oracle(  # noqa: E731
            lambda q: oracle.normalize(q, p), (x["q"],), x["dx"], directional, "normalize")
        yield Check("routing", "normalize_vjp", label, dtype, x, gradient=True, oracle_kind=kind, part=part,
                    call=normalize_vjp, oracle=normalize_oracle)
        yield Check("routing", "normalize:autodiff", label, dtype, x, gradient=True, part=part,
                    call=lambda ns, x, p=profile: ns.normalize(x["q"], profile=p),
                    autodiff=Autodiff(("q",), ("dx",), lambda ns, x, p=profile: (normalize_vjp(ns, x, p),)))
    yield Check("routing", "route", label, dtype, x, discrete=frozenset({0}), oracle_kind="naive sort", part=part,
                call=lambda ns, x, w=window: ns.route(x["s"], w, key_padding_mask=x["mask"]),
                oracle=lambda x, w=window: oracle.route(x["s"], w, x["mask"]))
    yield Check("routing", "assign", label, dtype, x, discrete=frozenset({0}), oracle_kind="naive argmax", part=part,
                call=lambda ns, x: ns.assign(x["x_hat"], x["centroids"], key_padding_mask=x["mask"]),
                oracle=lambda x: oracle.assign(x["x_hat"], x["centroids"], x["mask"]))

    def combine_vjp(ns, x, p=profile):
        return ns.combine_vjp(x["qm"], x["dcombined"], profile=p)

    combine_oracle = lambda x, p=profile, n=length: _gradient_oracle(  # noqa: E731
        lambda o: _naive_combine(o, x["qm"], n, p), (x["o"],), x["dcombined"], directional, "combine")
    yield Check("routing", "combine", label, dtype, x, oracle_kind="naive loops", part=part,
                call=lambda ns, x, p=profile, n=length: ns.combine(x["o"], x["qm"], n, profile=p),
                oracle=lambda x, p=profile, n=length: _naive_combine(x["o"], x["qm"], n, p))
    if with_gradients:
        yield Check("routing", "combine_vjp", label, dtype, x, gradient=True, oracle_kind=kind, part=part,
                    call=combine_vjp, oracle=combine_oracle)
        yield Check("routing", "combine:autodiff", label, dtype, x, gradient=True, part=part,
                    call=lambda ns, x, p=profile, n=length: ns.combine(x["o"], x["qm"], n, profile=p),
                    autodiff=Autodiff(("o",), ("dcombined",), lambda ns, x, p=profile: (combine_vjp(ns, x, p),)))
    # at L = 64 the loss (about 1e-4) is too large beside its directional derivative (about 1e-8) for a
    # difference quotient: there the oracle is the naive formula
    commitment_oracle = _naive_commitment_gradient if directional else lambda x: _gradient_oracle(
        lambda y: oracle.commitment_loss(y, x["centroids"], key_padding_mask=x["mask"]) * DLOSS,
        (x["x_hat"],), np.asarray(1.0), False, "commitment")
    yield from _commitment_checks(label, dtype, x, part, with_gradients, commitment_oracle)
    yield from _update_checks(label, dtype, x, profile, rng, part)
    if profile != "tacl":  # similarity does not depend on the profile
        return

    def similarity_vjp(ns, x):
        return tuple(ns.similarity_vjp(x["x_hat"], x["centroids"], x["ds"]))

    similarity_oracle = lambda x: _gradient_oracle(  # noqa: E731
        _naive_similarity, (x["x_hat"], x["centroids"]), x["ds"], directional, "similarity")
    yield Check("routing", "similarity", label, dtype, x, oracle_kind="naive loops", part=part,
                call=lambda ns, x: ns.similarity(x["x_hat"], x["centroids"]),
                oracle=lambda x: _naive_similarity(x["x_hat"], x["centroids"]))
    if with_gradients:
        yield Check("routing", "similarity_vjp", label, dtype, x, gradient=True, oracle_kind=kind, part=part,
                    call=similarity_vjp, oracle=similarity_oracle)
        yield Check("routing", "similarity:autodiff", label, dtype, x, gradient=True, part=part,
                    call=lambda ns, x: ns.similarity(x["x_hat"], x["centroids"]),
                    autodiff=Autodiff(("x_hat", "centroids"), ("ds",), similarity_vjp))


def _step_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, profile, padded in itertools.product(shapes, PROFILES, (False, True)):
        x = _step_inputs(shape, dtype, profile, padded, "base")
        yield from _step_case_checks(shape, profile, padded, dtype, "base", x, shape in gradient_shapes)


# --------------------------------------------------------------------------------------------
# local attention
# --------------------------------------------------------------------------------------------


def _local_case_checks(shape, causal, padded, block, dtype, part, x, with_gradients) -> Iterator[Check]:
    label = _label(shape, causal=causal, padded=padded) + f" block{block}"
    options = dict(causal=causal)
    directional = part == "large"

    def forward(ns, x, o=options):
        return ns.local_attention(x["q"], x["k"], x["v"], block, key_padding_mask=x["mask"], **o)

    def vjp(ns, x, o=options):
        return tuple(ns.local_attention_vjp(x["q"], x["k"], x["v"], block, x["dout"], key_padding_mask=x["mask"], **o))

    def differences(x, o=options):
        return _gradient_oracle(lambda q, k, v: oracle.local_attention(q, k, v, block, key_padding_mask=x["mask"], **o),
                                (x["q"], x["k"], x["v"]), x["dout"], directional, "local")

    yield Check("routing", "local_attention", label, dtype, x, oracle_kind="naive O(L^2)", part=part, call=forward,
                oracle=lambda x, o=options: oracle.local_attention(x["q"], x["k"], x["v"], block,
                                                                   key_padding_mask=x["mask"], **o))
    if not with_gradients:
        return
    yield Check("routing", "local_attention_vjp", label, dtype, x, gradient=True, oracle_kind=_kind(directional),
                part=part, call=vjp, oracle=differences)
    yield Check("routing", "local_attention:autodiff", label, dtype, x, gradient=True, part=part, call=forward,
                autodiff=Autodiff(("q", "k", "v"), ("dout",), vjp))


def _local_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, causal, padded in itertools.product(shapes, (False, True), (False, True)):
        x = _inputs(shape, dtype, "tacl", causal, False, padded, "local")
        yield from _local_case_checks(shape, causal, padded, BLOCK, dtype, "base", x, shape in gradient_shapes)


def _attention_checks(shapes, gradient_shapes, dtype, quick) -> Iterator[Check]:
    for shape, profile, causal, shared, padded in _configurations(shapes, quick):
        x = _inputs(shape, dtype, profile, causal, shared, padded, "attention")
        yield from _attention_case_checks(shape, profile, causal, shared, padded, dtype, "base", x,
                                          shape in gradient_shapes)


# --------------------------------------------------------------------------------------------
# ties
# --------------------------------------------------------------------------------------------


def _tie_checks(dtype) -> Iterator[Check]:
    batch, heads, length, clusters = 2, 2, 7, 3
    for padded in (False, True):
        rng = np.random.default_rng(seed_for("routing route ties", padded))
        # similarities from {-1, 0, 1}: equal values at the W-th place in most columns; one row all
        # equal (positions alone decide); padded: 5 unpadded tokens, so W = 6 leaves a slot empty
        s = rng.integers(-1, 2, size=(batch, heads, length, clusters)).astype(np.float64)
        s[1, 0] = 0.0
        mask = padding(rng, batch, length) if padded else None
        for window in (2, 6):
            label = f"B{batch} H{heads} L{length} C{clusters} W{window} integer similarities" + \
                (" padded" if padded else "")
            yield Check("routing", "route", label, dtype, {"s": s, "mask": mask}, discrete=frozenset({0}),
                        oracle_kind="naive sort", part="ties",
                        call=lambda ns, x, w=window: ns.route(x["s"], w, key_padding_mask=x["mask"]),
                        oracle=lambda x, w=window: oracle.route(x["s"], w, x["mask"]))
    batch, heads, length, dim, clusters = 2, 2, 6, 4, 4
    for profile, padded in itertools.product(PROFILES, (False, True)):
        rng = np.random.default_rng(seed_for("routing assign ties", profile, padded))
        # tokens and centroids from {-1, 0, 1}: dot products are small integers, exact in every dtype
        # and order of summation; centroid 3 repeats centroid 1, and other ties are frequent
        centroids = rng.integers(-1, 2, size=(heads, clusters, dim)).astype(np.float64)
        centroids[:, 3] = centroids[:, 1]
        x_hat = rng.integers(-1, 2, size=(batch, heads, length, dim)).astype(np.float64)
        x = {"x_hat": x_hat, "k_hat": rng.integers(-1, 2, size=x_hat.shape).astype(np.float64),
             "centroids": centroids, "mask": padding(rng, batch, length) if padded else None}
        label = f"B{batch} H{heads} L{length} D{dim} C{clusters} integer tokens {profile}" + \
            (" padded" if padded else "")
        yield Check("routing", "assign", label, dtype, x, discrete=frozenset({0}), oracle_kind="naive argmax",
                    part="ties", call=lambda ns, x: ns.assign(x["x_hat"], x["centroids"], key_padding_mask=x["mask"]),
                    oracle=lambda x: oracle.assign(x["x_hat"], x["centroids"], x["mask"]))
        if profile == "tacl":  # the loss does not depend on the profile
            yield from _commitment_checks(label, dtype, x, "ties", True, _naive_commitment_gradient)
        yield from _update_checks(label, dtype, x, profile, rng, "ties")


# --------------------------------------------------------------------------------------------
# extreme values and large shapes
# --------------------------------------------------------------------------------------------


def _self_logit_inputs(dtype: str) -> Inputs:
    """Shared QK, lucidrains: a token q = (65280, 65280, 65280, 4160) whose logit with the keys
    k̂ = -(1/2, 1/2, 1/2, 1/2) is exactly -(3 * 65280 + 4160) / 4 = -5e4, its own (self) logit: the
    constant decides how much it attends to itself. Every value is exact in float16 and bfloat16."""
    big = np.array([65280.0, 65280.0, 65280.0, 4160.0])
    rows = {"tie": -np.ones(4), "tie2": -2 * np.ones(4), "big": big, "opposite": -big / 4096}
    orders = [("tie", "big", "opposite", "tie2"), ("tie2", "opposite", "tie", "big"),
              ("opposite", "tie", "big", "tie2"), ("tie", "tie2", "big", "opposite")]
    rng = np.random.default_rng(seed_for("routing self logit"))
    q = np.stack([np.stack([rows[name] for name in orders[i]]) for i in range(4)]).reshape(2, 2, 4, 4)
    return {"q": q, "k": None, "v": rng.standard_normal((2, 2, 4, 3)), "centroids": rng.standard_normal((2, 2, 4)),
            "mask": None, "dout": rng.standard_normal((2, 2, 4, 3))}


def _local_overflow_checks() -> Iterator[Check]:
    """float64 only (the reference computes in float64, a backend in its dtype): local attention whose row 2
    of logits overflows (:func:`~refattn.conformance.checks.overflowing`), padding at position 3 of batch row
    0 and 0 of batch row 1. The expected error: the naive attention's out, or the dq it implies (NaN on the
    rows where out is), by the reference's overflow rules."""
    shape = (2, 1, 4, 4, 4, 1, 4)
    batch, heads, length, dim, dim_v = shape[:5]
    mask = np.zeros((batch, length), dtype=bool)
    mask[0, length - 1] = mask[1, 0] = True

    def naive(x):
        with np.errstate(over="ignore", invalid="ignore"):  # q . k overflows on purpose
            return oracle.local_attention(x["q"], x["k"], x["v"], BLOCK, key_padding_mask=x["mask"])

    def operands(x):
        return {name: x[name] for name in ("q", "k", "v", "dout")}

    for kind in ("nan", "inf"):
        rng = np.random.default_rng(seed_for("local overflow", kind))
        q, k = overflowing(kind, rng, (batch, heads, length, dim), 2)
        x = {"q": q, "k": k, "v": rng.standard_normal((batch, heads, length, dim_v)), "mask": mask,
             "dout": rng.standard_normal((batch, heads, length, dim_v))}
        label = _label(shape, padded=True) + f" block{BLOCK} logits {'NaN' if kind == 'nan' else '+inf'}"
        yield Check("routing", "local_attention", label, "float64", x, part="extreme", error=True,
                    oracle_kind="naive O(L^2)",
                    call=lambda ns, x: ns.local_attention(x["q"], x["k"], x["v"], BLOCK, key_padding_mask=x["mask"]),
                    oracle=lambda x: overflow_error(lambda: naive(x), LOCAL_OVERFLOWS["local_attention"],
                                                    **operands(x)))
        yield Check("routing", "local_attention_vjp", label, "float64", x, part="extreme", error=True, gradient=True,
                    oracle_kind="naive O(L^2)",
                    call=lambda ns, x: ns.local_attention_vjp(x["q"], x["k"], x["v"], BLOCK, x["dout"],
                                                              key_padding_mask=x["mask"]),
                    oracle=lambda x: overflow_error(lambda: (nan_rows(x["q"], ~np.isfinite(naive(x)).all(axis=-1)),),
                                                    LOCAL_OVERFLOWS["local_attention_vjp"], **operands(x)))


def _cluster_overflow_checks() -> Iterator[Check]:
    """float64 only, as :func:`_local_overflow_checks`: cluster attention in the lucidrains profile (raw
    q . k / sqrt(D); the tacl profile normalizes q and k first) whose token 2, in cluster 0, has logits that
    overflow. The expected error: the naive cluster outputs, or the dq they imply (NaN at the tokens of
    non-finite slots), by the reference's overflow rules."""
    shape = (2, 1, 8, 4, 4, 2, 4)
    batch, heads, length, dim, dim_v, clusters, window = shape
    members = np.broadcast_to(np.arange(length).reshape(clusters, window), (batch, heads, clusters, window)).copy()

    def naive(x):
        with np.errstate(over="ignore", invalid="ignore"):  # q . k overflows on purpose
            return oracle.cluster_attention(x["q"], x["k"], x["v"], x["qm"], x["km"], profile="lucidrains")

    def overflowed_dq(x):
        slots = ~np.isfinite(naive(x)).all(axis=-1)  # (B, H, C, W)
        rows = np.zeros(x["q"].shape[:3], dtype=bool)
        b, h, _, _ = np.nonzero(slots)
        rows[b, h, x["qm"][slots]] = True
        return nan_rows(x["q"], rows)

    def operands(x):
        return {name: x[name] for name in ("q", "k", "v", "do")}

    for kind in ("nan", "inf"):
        rng = np.random.default_rng(seed_for("cluster overflow", kind))
        q, k = overflowing(kind, rng, (batch, heads, length, dim), 2)
        x = {"q": q, "k": k, "v": rng.standard_normal((batch, heads, length, dim_v)), "qm": members, "km": members,
             "do": rng.standard_normal((batch, heads, clusters, window, dim_v))}
        label = _label(shape, profile="lucidrains") + f" logits {'NaN' if kind == 'nan' else '+inf'}"
        yield Check("routing", "cluster_attention", label, "float64", x, part="extreme", error=True,
                    oracle_kind="naive loops",
                    call=lambda ns, x: ns.cluster_attention(x["q"], x["k"], x["v"], x["qm"], x["km"],
                                                            profile="lucidrains"),
                    oracle=lambda x: overflow_error(lambda: naive(x), CLUSTER_OVERFLOWS["cluster_attention"],
                                                    **operands(x)))
        yield Check("routing", "cluster_attention_vjp", label, "float64", x, part="extreme", error=True,
                    gradient=True, oracle_kind="naive loops",
                    call=lambda ns, x: ns.cluster_attention_vjp(x["q"], x["k"], x["v"], x["qm"], x["km"], x["do"],
                                                                profile="lucidrains"),
                    oracle=lambda x: overflow_error(lambda: (overflowed_dq(x),),
                                                    CLUSTER_OVERFLOWS["cluster_attention_vjp"], **operands(x)))


def _extreme_checks(dtype) -> Iterator[Check]:
    shape = (2, 2, 4, 4, 3, 2, 4)  # C W >= L: every token in every cluster, no routing decision
    for causal in (False, True):
        x = _self_logit_inputs(dtype)
        yield from _attention_case_checks(shape, "lucidrains", causal, True, False, dtype, "extreme", x, False,
                                          forward_only=True)
    shape = (2, 2, 5, 4, 3, 2, 3)
    # features near 3e4: their squares overflow float16, LayerNorm must not
    x = _step_inputs(shape, dtype, "tacl", True, "extreme", scale=1e4)
    yield from _step_case_checks(shape, "tacl", True, dtype, "extreme", x, True)
    for causal in (False, True):
        x = _inputs(shape, dtype, "tacl", causal, False, True, "attention extreme", scale=1e4)
        yield from _attention_case_checks(shape, "tacl", causal, False, True, dtype, "extreme", x, True)
        # lucidrains unshared: raw q.k / sqrt(D) up to about 100
        if not causal:
            x = _inputs(shape, dtype, "lucidrains", causal, False, True, "attention extreme", scale=6.0)
            yield from _attention_case_checks(shape, "lucidrains", causal, False, True, dtype, "extreme", x, True)
        x = _inputs(shape, dtype, "tacl", causal, False, True, "local extreme", scale=6.0)
        yield from _local_case_checks(shape, causal, True, BLOCK, dtype, "extreme", x, True)
    if dtype == "float64":
        yield from _local_overflow_checks()
        yield from _cluster_overflow_checks()


def _large_checks(dtype) -> Iterator[Check]:
    shape = LARGE_SHAPE
    for profile in PROFILES:
        x = _step_inputs(shape, dtype, profile, True, "large")
        yield from _step_case_checks(shape, profile, True, dtype, "large", x, True)
    for causal in (False, True):
        x = _inputs(shape, dtype, "tacl", causal, False, True, "local large")
        yield from _local_case_checks(shape, causal, True, LARGE_BLOCK, dtype, "large", x, True)
    for profile, causal, shared in (("tacl", True, False), ("lucidrains", False, True)):
        x = _inputs(shape, dtype, profile, causal, shared, True, "attention large")
        yield from _attention_case_checks(shape, profile, causal, shared, True, dtype, "large", x, True)


def checks(dtype: str, *, quick: bool = False) -> Iterator[Check]:
    """Every Routing check for one dtype; ``quick`` keeps the two smallest shapes, a covering of the
    attention configurations and no large shape."""
    shapes = QUICK_SHAPES if quick else SHAPES
    gradient_shapes = [shape for shape in shapes if shape in GRADIENT_SHAPES]
    yield from _step_checks(shapes, gradient_shapes, dtype)
    yield from _local_checks(shapes, gradient_shapes, dtype)
    yield from _attention_checks(shapes, gradient_shapes, dtype, quick)
    yield from _tie_checks(dtype)
    yield from _extreme_checks(dtype)
    if not quick:  # the large shapes are the full grid's
        yield from _large_checks(dtype)
