"""The FSAT checks: every function of the ``fsat`` namespace, forward, VJP and autograd, over a grid of cases.

The grid has the four parts of :data:`refattn.conformance.checks.PARTS`:

- ``base``: shapes with B, H >= 2, L = 1, small primes and a power of two, odd D and Dv != D; flags
  causal or not, padding or not, Gumbel noise, separate cross inputs, bias. The full grid takes every
  combination of the flags, the quick grid the three smallest shapes (``attention``'s gradients at
  the largest of them) and a pairwise covering of the flags
  (:func:`~refattn.conformance.checks.flag_grid`). Inputs whose selection is not tie-free by the
  dtype's margin, judged on the inputs rounded to the dtype, are replaced by the next seed.
- ``ties``: ``select`` on integer-valued scores and noise, with offsets that have no pair (-inf),
  causal or not: the tie rule of spec/interface.md decides most choices.
- ``extreme``: logits up to about 100 (beyond float32's exp unless the maximum is subtracted first)
  and cross inputs whose products reach 1.6e4 (float16 sums of a few of them overflow); in float64,
  q and k whose logits overflow: a row of NaN logits, or one of +inf, must raise the reference's
  overflow error (an error check) next to legitimately empty (padded) rows, and a row whose other
  logits overflow to -inf gives them weight 0.
- ``large`` (full grid only): L = 64, D = 32, where accumulating in half precision shows; the
  reference's gradients are checked there along a random direction
  (:func:`~refattn.conformance.gradcheck.directional_vjp`).

Each differentiable function is also differentiated through the backend's autograd
(``<function>:autodiff``), ``attention`` with the gradient truncation of spec/fsat.md step 4.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import refattn.fsat as fsat_reference
from refattn.conformance import tolerances
from refattn.conformance.checks import (
    HUGE,
    Autodiff,
    Check,
    Inputs,
    flag_grid,
    nan_rows,
    overflow_error,
    overflowing,
    padding,
    seed_for,
)
from refattn.conformance.gradcheck import Projection, directional_vjp, numerical_vjp
from refattn.conformance.oracles import fsat as oracle
from refattn.fsat.attention import OVERFLOWS as ATTENTION_OVERFLOWS
from refattn.fsat.sparse_attention import OVERFLOWS as SPARSE_OVERFLOWS

# (B, H, L, D, Dv)
SHAPES = [(2, 2, 1, 3, 3), (2, 2, 2, 4, 4), (2, 2, 5, 3, 2), (2, 3, 7, 5, 5), (2, 2, 8, 4, 6)]
QUICK_SHAPES = SHAPES[:3]
# Finite differences cost two oracle calls per input element, so gradients are checked on the shapes
# up to L = 7.
GRADIENT_SHAPES = SHAPES[:4]
LARGE_SHAPE = (2, 2, 64, 32, 16)
TOP_K = 3


def _label(shape: tuple[int, ...], **flags: bool) -> str:
    batch, heads, length, dim, dim_v = shape
    words = [name for name, on in flags.items() if on]
    return f"B{batch} H{heads} L{length} D{dim} Dv{dim_v}" + "".join(f" {word}" for word in words)


def _tie_free(s: np.ndarray, noise: np.ndarray | None, top_k: int, causal: bool, dtype: str) -> bool:
    """True when the scores' K-th and (K+1)-th candidates differ by the decision margin.

    ``s`` and ``noise`` must be what the backend sees: computed from, or rounded to, ``dtype``.
    """
    scores = s if noise is None else s + noise
    length = (scores.shape[-1] + 1) // 2
    taus = np.arange(-(length - 1), length)
    candidates = scores[..., (taus < 0) if causal else (taus != 0)]
    if top_k - 1 >= candidates.shape[-1] or top_k == 1:
        return True
    ordered = -np.sort(-candidates, axis=-1)
    above, below = ordered[..., top_k - 2], ordered[..., top_k - 1]
    return bool(np.all((above - below > tolerances.decision_margin(above, dtype)) | np.isneginf(below)))


def _sequences(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> dict[str, np.ndarray]:
    batch, heads, length, dim, dim_v = shape
    return {
        "q": scale * rng.standard_normal((batch, heads, length, dim)),
        "k": scale * rng.standard_normal((batch, heads, length, dim)),
        "v": rng.standard_normal((batch, heads, length, dim_v)),
    }


def _without_none(grads: Any) -> tuple[Any, ...]:
    return tuple(g for g in grads if g is not None)


# --------------------------------------------------------------------------------------------
# cross and estimate
# --------------------------------------------------------------------------------------------


def _step_inputs(shape, padded, seed_words, scale=1.0) -> Inputs:
    batch, heads, length, dim, _ = shape
    rng = np.random.default_rng(seed_for(*seed_words))
    if scale == 1.0:
        a, b = rng.standard_normal((2, batch, heads, length, dim))
        c = rng.standard_normal((batch, heads, 2 * length - 1, dim))
        w = rng.standard_normal((heads, dim))
    else:  # products up to scale**2, and scores and dw below float16's limit
        a, b = rng.uniform(-scale, scale, (2, batch, heads, length, dim))
        c = rng.uniform(-scale * scale, scale * scale, (batch, heads, 2 * length - 1, dim))
        w = rng.uniform(-0.5, 0.5, (heads, dim))
    return {"a": a, "b": b, "c": c, "w": w, "mask": padding(rng, batch, length) if padded else None,
            "dc": rng.standard_normal((batch, heads, 2 * length - 1, dim)),
            "ds": rng.uniform(-0.5, 0.5, (batch, heads, 2 * length - 1))}


def _cross_gradient_oracle(x: Inputs, directional: bool) -> Any:
    f = lambda a, b: oracle.cross(a, b, x["mask"])  # noqa: E731
    if directional:
        return directional_vjp(f, (x["a"], x["b"]), x["dc"], np.random.default_rng(seed_for("direction cross")))
    return numerical_vjp(f, (x["a"], x["b"]), x["dc"], eps=_step(x["a"]))


def _estimate_gradient_oracle(x: Inputs, directional: bool) -> Any:
    s = oracle.estimate(x["c"], x["w"], x["mask"])
    ds = np.where(np.isfinite(s), x["ds"], 0.0)  # -inf scores carry no gradient
    f = lambda c, w: oracle.estimate(c, w, x["mask"])  # noqa: E731
    if directional:
        return directional_vjp(f, (x["c"], x["w"]), ds, np.random.default_rng(seed_for("direction estimate")))
    return numerical_vjp(f, (x["c"], x["w"]), ds, eps=_step(x["c"]))


def _step(x: np.ndarray) -> float:
    """A finite-difference step relative to the inputs' magnitude (1e-6 for inputs of order one)."""
    return 1e-6 * max(1.0, float(np.abs(x).max(initial=0.0)))


def _step_case_checks(shape, padded, dtype, part, x, with_gradients) -> Iterator[Check]:
    length = shape[2]
    batch = shape[0]
    label = _label(shape, padded=padded)
    directional = part == "large"
    if dtype == "float64" and part == "base":
        yield Check("fsat", "pair_counts", label, dtype, x, discrete=frozenset({0}),
                    call=lambda ns, x, n=length: ns.pair_counts(n, x["mask"]),
                    oracle=lambda x, n=length, b=batch: oracle.pair_counts(n, x["mask"], 1 if x["mask"] is None else b),
                    oracle_kind="naive O(L^2)")
    yield Check("fsat", "cross", label, dtype, x, part=part,
                call=lambda ns, x: ns.cross(x["a"], x["b"], key_padding_mask=x["mask"]),
                oracle=lambda x: oracle.cross(x["a"], x["b"], x["mask"]), oracle_kind="naive O(L^2)",
                fft=lambda x: (tolerances.fft_bound(length, dtype, x["a"], x["b"], x["mask"]),))
    yield Check("fsat", "estimate", label, dtype, x, part=part,
                call=lambda ns, x: ns.estimate(x["c"], x["w"], key_padding_mask=x["mask"]),
                oracle=lambda x: oracle.estimate(x["c"], x["w"], x["mask"]), oracle_kind="naive O(L^2)")
    if not with_gradients:
        return
    kind = "directional finite differences" if directional else "finite differences"

    def cross_vjp(ns, x):
        return tuple(ns.cross_vjp(x["a"], x["b"], x["dc"], key_padding_mask=x["mask"]))

    def estimate_vjp(ns, x):
        return tuple(ns.estimate_vjp(x["c"], x["w"], x["ds"], key_padding_mask=x["mask"]))

    def fft(x):  # da and db are convolutions computed by FFT
        return tolerances.fft_bound(length, dtype, x["a"], x["b"], x["mask"], x["dc"])

    yield Check("fsat", "cross_vjp", label, dtype, x, gradient=True, part=part, call=cross_vjp,
                oracle=lambda x: _cross_gradient_oracle(x, directional), oracle_kind=kind, fft=fft)
    yield Check("fsat", "cross:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x: ns.cross(x["a"], x["b"], key_padding_mask=x["mask"]),
                autodiff=Autodiff(("a", "b"), ("dc",), cross_vjp), fft=fft)
    yield Check("fsat", "estimate_vjp", label, dtype, x, gradient=True, part=part, call=estimate_vjp,
                oracle=lambda x: _estimate_gradient_oracle(x, directional), oracle_kind=kind)
    yield Check("fsat", "estimate:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x: ns.estimate(x["c"], x["w"], key_padding_mask=x["mask"]),
                autodiff=Autodiff(("c", "w"), ("ds",), estimate_vjp))


def _step_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, padded in itertools.product(shapes, (False, True)):
        x = _step_inputs(shape, padded, ("fsat steps", shape, padded))
        yield from _step_case_checks(shape, padded, dtype, "base", x, shape in gradient_shapes)


# --------------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------------


def _select_check(label, dtype, s, noise, top_k, causal, part) -> Check:
    return Check("fsat", "select", label, dtype, {"s": s, "noise": noise}, discrete=frozenset({0}), part=part,
                 call=lambda ns, x, k=top_k, c=causal: ns.select(x["s"], k, causal=c, noise=x["noise"]),
                 oracle=lambda x, k=top_k, c=causal: oracle.select(x["s"], k, c, x["noise"]),
                 oracle_kind="naive sort")


def _select_checks(shapes, dtype) -> Iterator[Check]:
    for shape, causal, noisy, top_k in itertools.product(shapes, (False, True), (False, True), (1, TOP_K, 64)):
        batch, heads, length, _, _ = shape
        label = _label(shape, causal=causal, noise=noisy) + f" K{top_k}"
        for attempt in range(200):
            rng = np.random.default_rng(seed_for("fsat select", shape, causal, noisy, top_k, attempt))
            s = rng.standard_normal((batch, heads, 2 * length - 1))
            s[0, 0, rng.permutation(2 * length - 1)[: length // 2]] = -np.inf  # offsets with no pair
            noise = rng.gumbel(size=s.shape) if noisy else None
            if _tie_free(tolerances.round_to(s, dtype), tolerances.round_to(noise, dtype), top_k, causal, dtype):
                break
        yield _select_check(label, dtype, s, noise, top_k, causal, "base")


def _select_tie_checks(dtype) -> Iterator[Check]:
    """Scores and noise from {-1, 0, 1} (exact in every dtype): equal candidates at the K-th place in
    most rows, one row all equal (the candidate order alone decides); "padded": the outermost offsets
    and a few more score -inf (no pair), and K reaches into them, where the order decides too."""
    batch, heads, length = 2, 3, 5
    for causal, noisy, padded in itertools.product((False, True), repeat=3):
        rng = np.random.default_rng(seed_for("fsat select ties", causal, noisy, padded))
        s = rng.integers(-1, 2, size=(batch, heads, 2 * length - 1)).astype(np.float64)
        s[1, 0] = 0.0
        if padded:
            s[:, :, [0, 1, -1]] = -np.inf
            s[0, 1, rng.permutation(2 * length - 1)[:3]] = -np.inf
        noise = rng.integers(-1, 2, size=s.shape).astype(np.float64) if noisy else None
        for top_k in (2, 3, 5, 8):
            label = f"B{batch} H{heads} L{length} integer scores" + (" causal" if causal else "") + \
                (" noise" if noisy else "") + (" padded" if padded else "") + f" K{top_k}"
            yield _select_check(label, dtype, s, noise, top_k, causal, "ties")


# --------------------------------------------------------------------------------------------
# sparse attention
# --------------------------------------------------------------------------------------------


def _sparse_inputs(shape, padded, biased, with_zero, seed_words=("fsat sparse",), scale=1.0,
                   bias_scale=1.0, count=TOP_K) -> Inputs:
    batch, heads, length, _, _ = shape
    rng = np.random.default_rng(seed_for(*seed_words, shape, padded, biased, with_zero))
    x = _sequences(rng, shape, scale)
    taus = np.arange(-(length - 1), length)
    pool = taus if with_zero else taus[taus != 0]
    count = min(count, len(pool))
    chosen = np.stack([np.sort(rng.choice(pool, count, replace=False)) for _ in range(batch * heads)])
    x["offsets"] = chosen.reshape(batch, heads, count).astype(np.int64)
    x["bias"] = bias_scale * rng.standard_normal((batch, heads, count)) if biased else None
    x["mask"] = padding(rng, batch, length) if padded else None
    x["dout"] = rng.standard_normal(x["v"].shape)
    x["dlse"] = rng.standard_normal((batch, heads, length))
    return x


def _sparse_forward(ns, x, causal):
    return ns.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], causal=causal,
                               key_padding_mask=x["mask"])


def _sparse_vjp(ns, x, causal):
    return tuple(ns.sparse_attention_vjp(x["q"], x["k"], x["v"], x["offsets"], x["bias"], x["dout"], dlse=x["dlse"],
                                         causal=causal, key_padding_mask=x["mask"]))


def _sparse_gradient_oracle(x: Inputs, causal: bool, directional: bool) -> Any:
    # lse is -inf on empty rows; its cotangent there is zeroed, as a backend must ignore it.
    _, lse = oracle.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], causal, x["mask"])
    dlse = np.where(np.isfinite(lse), x["dlse"], 0.0)
    arrays = (x["q"], x["k"], x["v"]) + ((x["bias"],) if x["bias"] is not None else ())

    def f(q, k, v, *bias):
        return oracle.sparse_attention(q, k, v, x["offsets"], bias[0] if bias else None, causal, x["mask"])

    if directional:
        return directional_vjp(f, arrays, (x["dout"], dlse), np.random.default_rng(seed_for("direction sparse")))
    grads = numerical_vjp(f, arrays, (x["dout"], dlse), eps=_step(x["q"]))
    return grads + ((None,) if x["bias"] is None else ())


def _sparse_case_checks(shape, flags, dtype, part, x, with_gradients) -> Iterator[Check]:
    causal = flags["causal"]
    label = _label(shape, causal=causal, padded=flags["padded"], bias=flags["bias"],
                   **{"no-zero-offset": not flags["with_zero"]})
    yield Check("fsat", "sparse_attention", label, dtype, x, part=part,
                call=lambda ns, x, c=causal: _sparse_forward(ns, x, c),
                oracle=lambda x, c=causal: oracle.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"],
                                                                   c, x["mask"]),
                oracle_kind="naive O(L^2)")
    if not with_gradients:
        return
    directional = part == "large"
    kind = "directional finite differences" if directional else "finite differences"
    yield Check("fsat", "sparse_attention_vjp", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, c=causal: _sparse_vjp(ns, x, c),
                oracle=lambda x, c=causal: _sparse_gradient_oracle(x, c, directional), oracle_kind=kind)
    wrt = ("q", "k", "v") + (("bias",) if x["bias"] is not None else ())
    yield Check("fsat", "sparse_attention:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, c=causal: _sparse_forward(ns, x, c),
                autodiff=Autodiff(wrt, ("dout", "dlse"), lambda ns, x, c=causal: _without_none(_sparse_vjp(ns, x, c))))


def _sparse_checks(shapes, gradient_shapes, dtype, quick) -> Iterator[Check]:
    for shape in shapes:
        for flags in flag_grid(("causal", "padded", "bias", "with_zero"), quick=quick):
            if shape[2] == 1 and not flags["with_zero"]:
                continue  # L = 1 has no offset but 0
            x = _sparse_inputs(shape, flags["padded"], flags["bias"], flags["with_zero"])
            yield from _sparse_case_checks(shape, flags, dtype, "base", x, shape in gradient_shapes)


# --------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------


def _attention_inputs(shape, dtype, flags, function, scale=1.0, w_scale=0.5) -> Inputs:
    """Inputs for ``attention``: a selection tie-free in ``dtype``, found by trying seeds in a fixed order."""
    batch, heads, length, dim, _ = shape
    causal, padded, noisy, crossed = (flags[name] for name in ("causal", "padded", "noise", "cross"))
    for attempt in range(200):
        rng = np.random.default_rng(seed_for("fsat", function, shape, causal, padded, noisy, crossed, attempt))
        inputs = _sequences(rng, shape, scale)
        inputs["w"] = scale * (1.0 + w_scale * rng.standard_normal((heads, dim)))
        inputs["mask"] = padding(rng, batch, length) if padded else None
        inputs["noise"] = rng.gumbel(size=(batch, heads, 2 * length - 1)) if noisy else None
        inputs["cross_q"] = rng.standard_normal((batch, heads, length, dim)) if crossed else None
        inputs["cross_k"] = rng.standard_normal((batch, heads, length, dim)) if crossed else None
        seen = {name: tolerances.round_to(inputs[name], dtype)
                for name in ("q", "k", "w", "noise", "cross_q", "cross_k")}
        a = seen["cross_q"] if crossed else seen["q"]
        b = seen["cross_k"] if crossed else seen["k"]
        s = oracle.estimate(oracle.cross(a, b, inputs["mask"]), seen["w"], inputs["mask"])
        if _tie_free(s, seen["noise"], TOP_K, causal, dtype):
            inputs["dout"] = rng.standard_normal(inputs["v"].shape)
            return inputs
    raise RuntimeError(f"no tie-free seed for fsat.{function} {shape}")


def _attention_kwargs(x: Inputs, causal: bool) -> dict[str, Any]:
    return dict(causal=causal, key_padding_mask=x["mask"], noise=x["noise"], cross_q=x["cross_q"],
                cross_k=x["cross_k"])


def _attention_forward(ns, x, causal):
    return ns.attention(x["q"], x["k"], x["v"], x["w"], TOP_K, **_attention_kwargs(x, causal))


def _attention_vjp(ns, x, causal):
    return tuple(ns.attention_vjp(x["q"], x["k"], x["v"], x["w"], TOP_K, x["dout"], **_attention_kwargs(x, causal)))


def _oracle_plan(x: Inputs, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bias) the oracles select for ``attention``'s inputs."""
    length = x["q"].shape[2]
    a = x["q"] if x["cross_q"] is None else x["cross_q"]
    b = x["k"] if x["cross_k"] is None else x["cross_k"]
    s = oracle.estimate(oracle.cross(a, b, x["mask"]), x["w"], x["mask"])
    offsets = oracle.select(s, TOP_K, causal, x["noise"])
    return offsets, np.take_along_axis(s, offsets + length - 1, axis=2)


def _attention_gradient_oracle(x: Inputs, causal: bool, directional: bool) -> Any:
    """FSAT's truncated gradient from finite differences of the naive oracles.

    q, k, v: differences of the dense sparse attention at the offsets and bias the oracle selects
    (the cross path is cut). w and the cross inputs: differences of the whole oracle forward (the
    selection is locally constant because the inputs are tie-free).
    """
    offsets, bias = _oracle_plan(x, causal)
    crossed = x["cross_q"] is not None

    def attended(q, k, v):
        return oracle.sparse_attention(q, k, v, offsets, bias, causal, x["mask"])[0]

    def whole(w, *cross_inputs):
        cross_q, cross_k = cross_inputs if crossed else (None, None)
        return oracle.attention(x["q"], x["k"], x["v"], w, TOP_K, causal, x["mask"], x["noise"], cross_q, cross_k)

    planned = (x["w"], x["cross_q"], x["cross_k"]) if crossed else (x["w"],)
    if directional:
        # one direction over (q, k, v) and one over the planning inputs: the two paths add up
        rng = np.random.default_rng(seed_for("direction attention"))
        first = directional_vjp(attended, (x["q"], x["k"], x["v"]), x["dout"], rng)
        second = directional_vjp(whole, planned, x["dout"], rng)
        return Projection(first.directions + second.directions, first.value + second.value)
    dq, dk, dv = numerical_vjp(attended, (x["q"], x["k"], x["v"]), x["dout"], eps=_step(x["q"]))
    estimator = numerical_vjp(whole, planned, x["dout"], eps=_step(x["q"]))
    dcross_q, dcross_k = estimator[1:] if crossed else (None, None)
    return dq, dk, dv, estimator[0], dcross_q, dcross_k


def _attention_fft(x: Inputs, causal: bool, dtype: str) -> tuple[Any, ...]:
    """The FFT's error bound of the cross inputs' gradients (the others: none), whose cotangent dc is the
    estimator path's: the reference's dbias at its offsets, through the estimate's VJP."""
    if x["cross_q"] is None:
        return ()
    length = x["q"].shape[2]
    c = fsat_reference.cross(x["cross_q"], x["cross_k"], key_padding_mask=x["mask"])
    s = fsat_reference.estimate(c, x["w"], key_padding_mask=x["mask"])
    offsets = fsat_reference.select(s, TOP_K, causal=causal, noise=x["noise"])
    bias = np.take_along_axis(s, offsets + length - 1, axis=2)
    dbias = fsat_reference.sparse_attention_vjp(x["q"], x["k"], x["v"], offsets, bias, x["dout"], causal=causal,
                                                key_padding_mask=x["mask"])[3]
    ds = np.zeros_like(s)
    np.put_along_axis(ds, offsets + length - 1, dbias, axis=2)
    dc = fsat_reference.estimate_vjp(c, x["w"], ds, key_padding_mask=x["mask"])[0]
    return (None,) * 4 + tuple(tolerances.fft_bound(length, dtype, x["cross_q"], x["cross_k"], x["mask"], dc))


def _attention_case_checks(shape, flags, dtype, part, x, with_gradients) -> Iterator[Check]:
    causal = flags["causal"]
    label = _label(shape, **flags)
    yield Check("fsat", "attention", label, dtype, x, part=part,
                call=lambda ns, x, c=causal: _attention_forward(ns, x, c),
                oracle=lambda x, c=causal: oracle.attention(x["q"], x["k"], x["v"], x["w"], TOP_K,
                                                            **_attention_kwargs(x, c)),
                oracle_kind="naive O(L^2)")
    if not with_gradients:
        return
    directional = part == "large"
    kind = "directional finite differences" if directional else "finite differences"
    yield Check("fsat", "attention_vjp", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, c=causal: _attention_vjp(ns, x, c),
                oracle=lambda x, c=causal: _attention_gradient_oracle(x, c, directional), oracle_kind=kind,
                fft=lambda x, c=causal: _attention_fft(x, c, dtype))
    wrt = ("q", "k", "v", "w") + (("cross_q", "cross_k") if flags["cross"] else ())
    yield Check("fsat", "attention:autodiff", label, dtype, x, gradient=True, part=part,
                call=lambda ns, x, c=causal: _attention_forward(ns, x, c),
                autodiff=Autodiff(wrt, ("dout",), lambda ns, x, c=causal: _without_none(_attention_vjp(ns, x, c))),
                fft=lambda x, c=causal: _attention_fft(x, c, dtype))


def _attention_checks(shapes, gradient_shapes, dtype, quick) -> Iterator[Check]:
    for shape in shapes:
        for flags in flag_grid(("causal", "padded", "noise", "cross"), quick=quick):
            x = _attention_inputs(shape, dtype, flags, "attention")
            # finite differences through noise and cross inputs together would add little but time
            wants_gradient = shape in gradient_shapes and not (flags["noise"] and flags["cross"])
            yield from _attention_case_checks(shape, flags, dtype, "base", x, wants_gradient)


# --------------------------------------------------------------------------------------------
# the extreme and large parts
# --------------------------------------------------------------------------------------------


def _extreme_checks(dtype) -> Iterator[Check]:
    shape = (2, 2, 5, 4, 4)
    for padded in (False, True):
        # |a_i b_j| up to 1.6e4: a float16 sum of five of them overflows; c, s and dw stay below 4e4
        x = _step_inputs(shape, padded, ("fsat extreme steps", padded), scale=128.0)
        yield from _step_case_checks(shape, padded, dtype, "extreme", x, True)
    shape = (2, 2, 7, 4, 4)
    for causal in (False, True):
        # q, k ~ 6 N(0, 1): logits q.k / 2 up to about 100, bias ~ 10 N(0, 1)
        flags = {"causal": causal, "padded": True, "bias": True, "with_zero": True}
        x = _sparse_inputs(shape, True, True, True, ("fsat extreme sparse", causal), scale=6.0, bias_scale=10.0,
                           count=4)
        yield from _sparse_case_checks(shape, flags, dtype, "extreme", x, True)
        flags = {"causal": causal, "padded": True, "noise": False, "cross": False}
        # q, k ~ 4 N(0, 1) and w ~ 4: scores (the bias) and logits of several tens
        x = _attention_inputs(shape, dtype, flags, "attention extreme", scale=4.0)
        yield from _attention_case_checks(shape, flags, dtype, "extreme", x, True)
    if dtype == "float64":
        yield from _overflow_checks()


OVERFLOW_SHAPE = (2, 1, 5, 4, 4)
OVERFLOW_ROW = 2  # the query whose logits overflow, in both batch rows
OVERFLOW_OFFSETS = (-1, 0, 2)  # tau = -1 first: the row's first pair already overflows


def _overflow_inputs(kind: str, crossed: bool) -> Inputs:
    """Inputs whose row OVERFLOW_ROW of logits overflows (:func:`~refattn.conformance.checks.overflowing`:
    ``nan``, ``inf``; ``neg_inf`` with k_(i-1) = k_(i+2) = HUGE (1, 1, 1, 1), whose logits of -inf get weight
    0, the row attending to its own key alone).

    Padding masks position 4 of batch row 0 and 0 of batch row 1 (rows with lse -inf, out 0). With
    ``crossed``, cross inputs of order one, w and padding from :func:`_attention_inputs` (a tie-free selection).
    """
    shape = OVERFLOW_SHAPE
    batch, heads, length, dim, dim_v = shape
    if crossed:
        flags = {"causal": False, "padded": True, "noise": False, "cross": True}
        x = _attention_inputs(shape, "float64", flags, f"attention overflow {kind}")
    else:
        x = {"mask": np.zeros((batch, length), dtype=bool)}
        x["mask"][0, length - 1] = x["mask"][1, 0] = True
    rng = np.random.default_rng(seed_for("fsat overflow", kind))
    i = OVERFLOW_ROW
    q, k = overflowing(kind, rng, (batch, heads, length, dim), i)
    if kind == "neg_inf":
        k[:, :, i - 1] = k[:, :, i + 2] = HUGE
    x.update(q=q, k=k, v=rng.standard_normal((batch, heads, length, dim_v)), bias=None,
             offsets=np.broadcast_to(np.array(OVERFLOW_OFFSETS), (batch, heads, 3)).copy(),
             dout=rng.standard_normal((batch, heads, length, dim_v)), dlse=rng.standard_normal((batch, heads, length)))
    return x


def _operands(x: Inputs) -> dict[str, Any]:
    """The arguments an overflow rule of ``sparse_attention`` or ``attention`` may name."""
    return {name: x.get(name) for name in ("q", "k", "v", "w", "dout", "cross_q", "cross_k")}


def _overflowed_dq(x: Inputs, naive: Callable[[Inputs], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """dq as far as an overflow decides it: NaN on the rows whose ``naive`` lse is NaN or +inf."""
    lse = naive(x)[1]
    return nan_rows(x["q"], np.isnan(lse) | (lse == np.inf))


def _naive_sparse(x: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's (out, lse) of ``sparse_attention`` on the overflow inputs."""
    with np.errstate(over="ignore", invalid="ignore"):  # q . k overflows on purpose
        return oracle.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], False, x["mask"])


def _naive_attention(x: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's (out, lse) of ``attention`` on the overflow inputs: the dense attention at its selection."""
    with np.errstate(over="ignore", invalid="ignore"):  # q . k overflows on purpose
        return oracle.sparse_attention(x["q"], x["k"], x["v"], *_oracle_plan(x, False), False, x["mask"])


def _overflow_checks() -> Iterator[Check]:
    """float64 only: the reference computes in float64 and a backend in its dtype, so in a narrower dtype they
    overflow at different magnitudes (and HUGE itself overflows float32). The expected error: the naive
    attention's lse, or the dq it implies, by the reference's overflow rules."""
    # (function, cross inputs, forward, gradient, naive (out, lse), the gradient's overflow rules)
    variants = (("sparse_attention", False, _sparse_forward, _sparse_vjp, _naive_sparse,
                 SPARSE_OVERFLOWS["sparse_attention_vjp"]),
                ("attention", True, _attention_forward, _attention_vjp, _naive_attention,
                 ATTENTION_OVERFLOWS["attention_vjp"]))
    for kind in ("nan", "inf"):
        for function, crossed, forward, vjp, naive, gradient_rules in variants:
            x = _overflow_inputs(kind, crossed)
            label = _label(OVERFLOW_SHAPE, padded=True, cross=crossed) + f" logits {'NaN' if kind == 'nan' else '+inf'}"
            yield Check("fsat", function, label, "float64", x, part="extreme", error=True,
                        call=lambda ns, x, f=forward: f(ns, x, False), oracle_kind="naive O(L^2)",
                        oracle=lambda x, n=naive: overflow_error(lambda: n(x), SPARSE_OVERFLOWS["sparse_attention"],
                                                                 **_operands(x)))
            yield Check("fsat", f"{function}_vjp", label, "float64", x, part="extreme", error=True, gradient=True,
                        call=lambda ns, x, f=vjp: f(ns, x, False), oracle_kind="naive O(L^2)",
                        oracle=lambda x, n=naive, r=gradient_rules: overflow_error(lambda: (_overflowed_dq(x, n),), r,
                                                                                   **_operands(x)))
    x = _overflow_inputs("neg_inf", False)
    yield Check("fsat", "sparse_attention", _label(OVERFLOW_SHAPE, padded=True) + " logits -inf", "float64", x,
                part="extreme", call=lambda ns, x: _sparse_forward(ns, x, False), oracle=_naive_sparse,
                oracle_kind="naive O(L^2)")
    # The +inf logit on a removed offset (bias -inf) is no pair: no overflow, the row attends to the others.
    x = _overflow_inputs("inf", False)
    x["bias"] = np.zeros(x["offsets"].shape)
    x["bias"][..., OVERFLOW_OFFSETS.index(0)] = -np.inf
    yield Check("fsat", "sparse_attention", _label(OVERFLOW_SHAPE, padded=True) + " logits +inf, bias -inf there",
                "float64", x, part="extreme", call=lambda ns, x: _sparse_forward(ns, x, False), oracle=_naive_sparse,
                oracle_kind="naive O(L^2)")


def _large_checks(dtype) -> Iterator[Check]:
    shape = LARGE_SHAPE
    x = _step_inputs(shape, True, ("fsat large steps",))
    yield from _step_case_checks(shape, True, dtype, "large", x, True)
    for causal in (False, True):
        flags = {"causal": causal, "padded": True, "bias": True, "with_zero": True}
        x = _sparse_inputs(shape, True, True, True, ("fsat large sparse", causal), count=8)
        yield from _sparse_case_checks(shape, flags, dtype, "large", x, True)
        flags = {"causal": causal, "padded": True, "noise": True, "cross": False}
        x = _attention_inputs(shape, dtype, flags, "attention large")
        yield from _attention_case_checks(shape, flags, dtype, "large", x, True)


def checks(dtype: str, *, quick: bool = False) -> Iterator[Check]:
    """Every FSAT check for one dtype; ``quick`` keeps the three smallest shapes (the pipeline's gradients
    at the largest of them), a covering of the flags and no large shape."""
    shapes = QUICK_SHAPES if quick else SHAPES
    gradient_shapes = [shape for shape in shapes if shape in GRADIENT_SHAPES]
    yield from _step_checks(shapes, gradient_shapes, dtype)
    yield from _select_checks(shapes, dtype)
    yield from _select_tie_checks(dtype)
    yield from _sparse_checks(shapes, gradient_shapes, dtype, quick)
    # the pipeline's gradients cost an FFT planning each: the quick grid takes them at L = 5 only (at
    # L <= 2 every offset is selected)
    yield from _attention_checks(shapes, gradient_shapes[-1:] if quick else gradient_shapes, dtype, quick)
    yield from _extreme_checks(dtype)
    if not quick:  # the large shapes are the full grid's
        yield from _large_checks(dtype)
