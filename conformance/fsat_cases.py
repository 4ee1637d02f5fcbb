"""The FSAT checks: every function of the ``fsat`` namespace, forward and VJP, over a grid of cases.

Shapes keep B, H >= 2 and include L = 1, small primes and a power of two, odd D and Dv != D; flags
cover causal or not, padding or not, Gumbel noise, and separate cross inputs. Inputs whose selection
is not tie-free by the dtype's margin are replaced by the next seed (see :func:`_tie_free`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from refattn.conformance import tolerances
from refattn.conformance.checks import Check, Inputs, padding, seed_for
from refattn.conformance.gradcheck import numerical_vjp
from refattn.conformance.oracles import fsat as oracle

# (B, H, L, D, Dv)
SHAPES = [(2, 2, 1, 3, 3), (2, 2, 2, 4, 4), (2, 2, 5, 3, 2), (2, 3, 7, 5, 5), (2, 2, 8, 4, 6)]
QUICK_SHAPES = SHAPES[:3]
# Finite differences cost two oracle calls per input element, so gradients are checked on the shapes
# up to L = 7.
GRADIENT_SHAPES = SHAPES[:4]
TOP_K = 3


def _label(shape: tuple[int, ...], **flags: bool) -> str:
    batch, heads, length, dim, dim_v = shape
    words = [name for name, on in flags.items() if on]
    return f"B{batch} H{heads} L{length} D{dim} Dv{dim_v}" + "".join(f" {word}" for word in words)



def _tie_free(s: np.ndarray, noise: np.ndarray | None, top_k: int, causal: bool, dtype: str) -> bool:
    """True when the scores' K-th and (K+1)-th candidates differ by the decision margin."""
    scores = s if noise is None else s + noise
    length = (scores.shape[-1] + 1) // 2
    taus = np.arange(-(length - 1), length)
    candidates = scores[..., (taus < 0) if causal else (taus != 0)]
    if top_k - 1 >= candidates.shape[-1] or top_k == 1:
        return True
    ordered = -np.sort(-candidates, axis=-1)
    above, below = ordered[..., top_k - 2], ordered[..., top_k - 1]
    return bool(np.all((above - below > tolerances.decision_margin(above, dtype)) | np.isneginf(below)))


def _sequences(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    batch, heads, length, dim, dim_v = shape
    return {
        "q": rng.standard_normal((batch, heads, length, dim)),
        "k": rng.standard_normal((batch, heads, length, dim)),
        "v": rng.standard_normal((batch, heads, length, dim_v)),
    }


def _attention_inputs(shape, dtype, causal, padded, noisy, crossed, function) -> Inputs:
    """Inputs for ``attention``: tie-free selection, found by trying seeds in a fixed order."""
    batch, heads, length, dim, _ = shape
    for attempt in range(200):
        rng = np.random.default_rng(seed_for("fsat", function, shape, causal, padded, noisy, crossed, attempt))
        inputs = _sequences(rng, shape)
        inputs["w"] = 1.0 + 0.5 * rng.standard_normal((heads, dim))
        inputs["mask"] = padding(rng, batch, length) if padded else None
        inputs["noise"] = rng.gumbel(size=(batch, heads, 2 * length - 1)) if noisy else None
        inputs["cross_q"] = rng.standard_normal((batch, heads, length, dim)) if crossed else None
        inputs["cross_k"] = rng.standard_normal((batch, heads, length, dim)) if crossed else None
        a = inputs["cross_q"] if crossed else inputs["q"]
        b = inputs["cross_k"] if crossed else inputs["k"]
        s = oracle.estimate(oracle.cross(a, b, inputs["mask"]), inputs["w"], inputs["mask"])
        if _tie_free(s, inputs["noise"], TOP_K, causal, dtype):
            return inputs
    raise RuntimeError(f"no tie-free seed for fsat.{function} {shape}")


def _attention_kwargs(x: Inputs, causal: bool) -> dict[str, Any]:
    return dict(causal=causal, key_padding_mask=x["mask"], noise=x["noise"], cross_q=x["cross_q"],
                cross_k=x["cross_k"])


def _attention_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, causal, padded, noisy, crossed in itertools.product(shapes, *[(False, True)] * 4):
        label = _label(shape, causal=causal, padded=padded, noise=noisy, cross=crossed)
        x = _attention_inputs(shape, dtype, causal, padded, noisy, crossed, "attention")
        yield Check(
            "fsat", "attention", label, dtype, x,
            call=lambda ns, x, c=causal: ns.attention(x["q"], x["k"], x["v"], x["w"], TOP_K, **_attention_kwargs(x, c)),
            oracle=lambda x, c=causal: oracle.attention(x["q"], x["k"], x["v"], x["w"], TOP_K,
                                                        **_attention_kwargs(x, c)),
            oracle_kind="naive O(L^2)",
        )
        if shape not in gradient_shapes or (noisy and crossed):
            continue
        x = dict(x, dout=np.random.default_rng(seed_for("dout", label)).standard_normal(x["v"].shape))
        yield Check(
            "fsat", "attention_vjp", label, dtype, x, gradient=True,
            call=lambda ns, x, c=causal: tuple(ns.attention_vjp(x["q"], x["k"], x["v"], x["w"], TOP_K, x["dout"],
                                                                **_attention_kwargs(x, c))),
            oracle=lambda x, c=causal: _attention_gradient_oracle(x, c),
            oracle_kind="finite differences",
        )


def _attention_gradient_oracle(x: Inputs, causal: bool) -> tuple[np.ndarray | None, ...]:
    """FSAT's truncated gradient from finite differences of the naive oracles.

    q, k, v: differences of the dense sparse attention at the offsets and bias the oracle selects
    (the cross path is cut). w and the cross inputs: differences of the whole oracle forward (the
    selection is locally constant because the inputs are tie-free).
    """
    length = x["q"].shape[2]
    a = x["q"] if x["cross_q"] is None else x["cross_q"]
    b = x["k"] if x["cross_k"] is None else x["cross_k"]
    s = oracle.estimate(oracle.cross(a, b, x["mask"]), x["w"], x["mask"])
    offsets = oracle.select(s, TOP_K, causal, x["noise"])
    bias = np.take_along_axis(s, offsets + length - 1, axis=2)
    dq, dk, dv = numerical_vjp(
        lambda q, k, v: oracle.sparse_attention(q, k, v, offsets, bias, causal, x["mask"])[0],
        (x["q"], x["k"], x["v"]), x["dout"])
    crossed = x["cross_q"] is not None

    def whole(w, *cross_inputs):
        cross_q, cross_k = cross_inputs if crossed else (None, None)
        return oracle.attention(x["q"], x["k"], x["v"], w, TOP_K, causal, x["mask"], x["noise"], cross_q, cross_k)

    estimator = numerical_vjp(whole, (x["w"], x["cross_q"], x["cross_k"]) if crossed else (x["w"],), x["dout"])
    dw = estimator[0]
    dcross_q, dcross_k = estimator[1:] if crossed else (None, None)
    return dq, dk, dv, dw, dcross_q, dcross_k


def _sparse_inputs(shape, padded, biased, with_zero) -> Inputs:
    batch, heads, length, _, _ = shape
    rng = np.random.default_rng(seed_for("fsat sparse", shape, padded, biased, with_zero))
    x = _sequences(rng, shape)
    taus = np.arange(-(length - 1), length)
    pool = taus if with_zero else taus[taus != 0]
    count = min(TOP_K, len(pool))
    chosen = np.stack([np.sort(rng.choice(pool, count, replace=False)) for _ in range(batch * heads)]) if count else \
        np.zeros((batch * heads, 0), dtype=np.int64)
    x["offsets"] = chosen.reshape(batch, heads, count).astype(np.int64)
    x["bias"] = rng.standard_normal((batch, heads, count)) if biased else None
    x["mask"] = padding(rng, batch, length) if padded else None
    x["dout"] = rng.standard_normal(x["v"].shape)
    x["dlse"] = rng.standard_normal((batch, heads, length))
    return x


def _sparse_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, causal, padded, biased, with_zero in itertools.product(shapes, *[(False, True)] * 4):
        if shape[2] == 1 and not with_zero:
            continue  # L = 1 has no offset but 0
        label = _label(shape, causal=causal, padded=padded, bias=biased, **{"no-zero-offset": not with_zero})
        x = _sparse_inputs(shape, padded, biased, with_zero)

        def forward(ns, x, c=causal):
            return ns.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], causal=c,
                                       key_padding_mask=x["mask"])

        yield Check("fsat", "sparse_attention", label, dtype, x, call=forward,
                    oracle=lambda x, c=causal: oracle.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"],
                                                                       c, x["mask"]),
                    oracle_kind="naive O(L^2)")
        if shape not in gradient_shapes:
            continue

        def backward(ns, x, c=causal):
            return ns.sparse_attention_vjp(x["q"], x["k"], x["v"], x["offsets"], x["bias"], x["dout"], dlse=x["dlse"],
                                           causal=c, key_padding_mask=x["mask"])

        def differences(x, c=causal):
            # lse is -inf on empty rows; its cotangent there is zeroed, as a backend must ignore it.
            out, lse = oracle.sparse_attention(x["q"], x["k"], x["v"], x["offsets"], x["bias"], c, x["mask"])
            dlse = np.where(np.isfinite(lse), x["dlse"], 0.0)
            arrays = (x["q"], x["k"], x["v"]) + ((x["bias"],) if x["bias"] is not None else ())
            grads = numerical_vjp(
                lambda q, k, v, *bias: oracle.sparse_attention(q, k, v, x["offsets"], bias[0] if bias else None, c,
                                                               x["mask"]),
                arrays, (x["dout"], dlse))
            return grads + ((None,) if x["bias"] is None else ())

        yield Check("fsat", "sparse_attention_vjp", label, dtype, x, call=backward, oracle=differences,
                    oracle_kind="finite differences", gradient=True)


def _step_checks(shapes, gradient_shapes, dtype) -> Iterator[Check]:
    for shape, padded in itertools.product(shapes, (False, True)):
        batch, heads, length, dim, _ = shape
        label = _label(shape, padded=padded)
        rng = np.random.default_rng(seed_for("fsat steps", shape, padded))
        x = {"a": rng.standard_normal((batch, heads, length, dim)),
             "b": rng.standard_normal((batch, heads, length, dim)),
             "c": rng.standard_normal((batch, heads, 2 * length - 1, dim)), "w": rng.standard_normal((heads, dim)),
             "mask": padding(rng, batch, length) if padded else None,
             "dc": rng.standard_normal((batch, heads, 2 * length - 1, dim)),
             "ds": rng.standard_normal((batch, heads, 2 * length - 1))}
        if dtype == "float64":
            yield Check("fsat", "pair_counts", label, dtype, x, discrete=frozenset({0}),
                        call=lambda ns, x, n=length: ns.pair_counts(n, x["mask"]),
                        oracle=lambda x, n=length, b=batch: oracle.pair_counts(n, x["mask"],
                                                                               1 if x["mask"] is None else b),
                        oracle_kind="naive O(L^2)")
        yield Check("fsat", "cross", label, dtype, x,
                    call=lambda ns, x: ns.cross(x["a"], x["b"], key_padding_mask=x["mask"]),
                    oracle=lambda x: oracle.cross(x["a"], x["b"], x["mask"]), oracle_kind="naive O(L^2)")
        yield Check("fsat", "estimate", label, dtype, x,
                    call=lambda ns, x: ns.estimate(x["c"], x["w"], key_padding_mask=x["mask"]),
                    oracle=lambda x: oracle.estimate(x["c"], x["w"], x["mask"]), oracle_kind="naive O(L^2)")
        if shape not in gradient_shapes:
            continue
        yield Check("fsat", "cross_vjp", label, dtype, x, gradient=True,
                    call=lambda ns, x: tuple(ns.cross_vjp(x["a"], x["b"], x["dc"], key_padding_mask=x["mask"])),
                    oracle=lambda x: numerical_vjp(lambda a, b: oracle.cross(a, b, x["mask"]), (x["a"], x["b"]),
                                                   x["dc"]),
                    oracle_kind="finite differences")

        def estimate_differences(x):
            s = oracle.estimate(x["c"], x["w"], x["mask"])
            ds = np.where(np.isfinite(s), x["ds"], 0.0)  # -inf scores carry no gradient
            return numerical_vjp(lambda c, w: oracle.estimate(c, w, x["mask"]), (x["c"], x["w"]), ds)

        yield Check("fsat", "estimate_vjp", label, dtype, x, gradient=True,
                    call=lambda ns, x: tuple(ns.estimate_vjp(x["c"], x["w"], x["ds"], key_padding_mask=x["mask"])),
                    oracle=estimate_differences, oracle_kind="finite differences")


def _select_checks(shapes, dtype) -> Iterator[Check]:
    for shape, causal, noisy, top_k in itertools.product(shapes, (False, True), (False, True), (1, TOP_K, 64)):
        batch, heads, length, _, _ = shape
        label = _label(shape, causal=causal, noise=noisy) + f" K{top_k}"
        for attempt in range(200):
            rng = np.random.default_rng(seed_for("fsat select", shape, causal, noisy, top_k, attempt))
            s = rng.standard_normal((batch, heads, 2 * length - 1))
            s[0, 0, rng.permutation(2 * length - 1)[: length // 2]] = -np.inf  # offsets with no pair
            noise = rng.gumbel(size=s.shape) if noisy else None
            if _tie_free(s, noise, top_k, causal, dtype):
                break
        x = {"s": s, "noise": noise}
        yield Check("fsat", "select", label, dtype, x, discrete=frozenset({0}),
                    call=lambda ns, x, k=top_k, c=causal: ns.select(x["s"], k, causal=c, noise=x["noise"]),
                    oracle=lambda x, k=top_k, c=causal: oracle.select(x["s"], k, c, x["noise"]),
                    oracle_kind="naive sort")


def checks(dtype: str, *, quick: bool = False) -> Iterator[Check]:
    """Every FSAT check for one dtype; ``quick`` keeps the three smallest shapes."""
    shapes = QUICK_SHAPES if quick else SHAPES
    gradient_shapes = [shape for shape in shapes if shape in GRADIENT_SHAPES]
    yield from _step_checks(shapes, gradient_shapes, dtype)
    yield from _select_checks(shapes, dtype)
    yield from _sparse_checks(shapes, gradient_shapes, dtype)
    yield from _attention_checks(shapes, gradient_shapes, dtype)
