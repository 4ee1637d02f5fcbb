"""Mutant backends for the conformance suite's mutation self-test (tests/test_conformance_mutants.py).

Each mutant is a plausible backend-author bug built at the interface level: it wraps a correct
backend (the torch backend, or for the second-device mutant the NumPy reference) and replaces one or
two functions of its namespaces by versions that compose the wrapped backend's public functions or
are written here from the spec with one thing wrong. Nothing here depends on a backend's internals
or on the conformance suite's code, so the same mutants can be run against any version of the suite.

``gap`` names the weakness of the suite, listed in issue 16, that the mutant probes: ties, autograd,
strategies (code paths and devices), dtypes, extreme (values), shapes, tolerances; ``classic`` ones
are bugs any version of the suite catches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from refattn import backends
from refattn.backends import Backend, Capabilities, Strategy

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Mutant:
    """A named bug: ``build()`` wraps a correct backend; ``replaces`` lists the ``algorithm.function``
    names it changes (the self-test runs only the checks that call them), on the quick grid or, when
    ``large``, on the full grid's large part (a bug that needs L > 32)."""

    name: str
    gap: str
    replaces: tuple[str, ...]
    build: Callable[[], Backend]
    description: str
    large: bool = False


def wrapper(base: Backend, name: str = "wrapper", **replacements: Callable[..., Any]) -> Backend:
    """``base`` with its namespaces copied and the functions ``replacements`` ("fsat__select": f) swapped in."""
    namespaces = {}
    for algorithm in ("fsat", "routing"):
        namespace = getattr(base, algorithm)
        members = {member: getattr(namespace, member) for member in namespace.__all__}
        prefix = algorithm + "__"
        members.update({key[len(prefix):]: f for key, f in replacements.items() if key.startswith(prefix)})
        namespaces[algorithm] = SimpleNamespace(**members)
    return dataclasses.replace(base, name=name, **namespaces)


def _torch() -> Backend:
    return backends.get_backend("torch")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _offset_positions(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(-(length - 1), length, device=device)


# --------------------------------------------------------------------------------------------
# small spec-level implementations, each with one knob a mutant turns
# --------------------------------------------------------------------------------------------


def _masked_softmax_attention(logits, allowed, v, *, stable=True):
    """(out, lse): softmax over the allowed entries of the last axis, rows with none give 0 and -inf."""
    logits = logits.masked_fill(~allowed, float("-inf"))
    if stable:
        peak = logits.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    else:  # the bug: exp of the raw logits
        peak = torch.zeros_like(logits[..., :1])
    weights = torch.exp(logits - peak)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.where(total > 0, (weights @ v) / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros(()))
    return out, (torch.log(total) + peak)[..., 0]


def _dense_sparse_attention(q, k, v, offsets, bias, causal, mask, *, stable):
    """spec/fsat.md step 3 as a dense masked L x L softmax."""
    cd = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    length = q.shape[2]
    positions = torch.arange(length)
    tau = positions[None, :] - positions[:, None]
    on = tau[None, None, None] == offsets[..., None, None]  # (B, H, K, L, L)
    logits = qc @ kc.transpose(-1, -2) / math.sqrt(q.shape[3])
    if bias is not None:
        logits = logits + torch.where(on, bias.to(cd)[..., None, None], torch.zeros((), dtype=cd)).sum(dim=2)
    allowed = on.any(dim=2)
    if causal:
        allowed = allowed & (tau <= 0)
    if mask is not None:
        real = ~mask
        allowed = allowed & real[:, None, :, None] & real[:, None, None, :]
    out, lse = _masked_softmax_attention(logits, allowed, vc, stable=stable)
    return out.to(q.dtype), lse.to(q.dtype)


def _local_attention(q, k, v, block, causal, mask, *, look_back):
    """spec/routing.md's local attention, each block seeing ``look_back`` blocks before it."""
    cd = _compute_dtype(q.dtype)
    length = q.shape[2]
    positions = torch.arange(length)
    blocks = positions // block
    apart = blocks[None, :] - blocks[:, None]
    allowed = (apart >= -look_back) & (apart <= (0 if causal else 1))
    if causal:
        allowed = allowed & (positions[None, :] <= positions[:, None])
    allowed = allowed.expand(q.shape[0], q.shape[1], length, length)
    if mask is not None:
        real = ~mask
        allowed = allowed & real[:, None, :, None] & real[:, None, None, :]
    logits = q.to(cd) @ k.to(cd).transpose(-1, -2) / math.sqrt(q.shape[3])
    out, _ = _masked_softmax_attention(logits, allowed, v.to(cd))
    return out.to(q.dtype)


def _half_accumulated_logits(q, k):
    """q k^T with the sum over the feature axis accumulated in the inputs' (half) precision."""
    total = torch.zeros(q.shape[:3] + (k.shape[2],), dtype=q.dtype)
    for d in range(q.shape[3]):
        term = (q[..., d, None].float() * k[..., d].float()[:, :, None, :]).to(q.dtype)
        total = (total.float() + term.float()).to(q.dtype)
    return total.float()


def _lucidrains_shared_cluster_attention(q, v, q_members, k_members, causal, self_logit):
    """spec/routing.md step 4, lucidrains profile, shared QK: keys are the normalized queries, a
    token's logit with itself is ``self_logit``."""
    cd = _compute_dtype(q.dtype)
    qc, vc = q.to(cd), v.to(cd)
    keys = qc / torch.linalg.vector_norm(qc, dim=-1, keepdim=True).clamp(min=1e-12)
    batch, heads, clusters, window = q_members.shape

    def rows(x, members):
        index = members.clamp(min=0).reshape(batch, heads, clusters * window, 1).expand(-1, -1, -1, x.shape[3])
        return torch.gather(x, 2, index).reshape(batch, heads, clusters, window, x.shape[3])

    logits = rows(qc, q_members) @ rows(keys, k_members).transpose(-1, -2) / math.sqrt(q.shape[3])
    itself = q_members[..., :, None] == k_members[..., None, :]
    logits = torch.where(itself, torch.full((), self_logit, dtype=cd), logits)
    allowed = (q_members[..., :, None] >= 0) & (k_members[..., None, :] >= 0)
    if causal:
        allowed = allowed & (k_members[..., None, :] <= q_members[..., :, None])
    out, _ = _masked_softmax_attention(logits, allowed, rows(vc, k_members))
    return out.to(q.dtype)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):  # type: ignore[override]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.factor, None


# --------------------------------------------------------------------------------------------
# the mutants
# --------------------------------------------------------------------------------------------


def _tie_nudged_select(weight: Callable[[torch.Tensor], torch.Tensor]):
    """select on s + 1e-9 weight(tau): equal scores now differ, in the wrong order; distinct ones
    (tie-free by at least 1e-4) keep theirs."""
    t = _torch()

    def select(s, top_k, *, causal=False, noise=None):
        tau = _offset_positions((s.shape[2] + 1) // 2, s.device)
        nudged = s.double() + 1e-9 * weight(tau).double()
        return t.fsat.select(nudged, top_k, causal=causal, noise=None if noise is None else noise.double())

    return select


def select_prefers_positive_offsets() -> Backend:
    return wrapper(_torch(), "select_prefers_positive_offsets", fsat__select=_tie_nudged_select(lambda tau: tau > 0))


def select_prefers_larger_offsets() -> Backend:
    return wrapper(_torch(), "select_prefers_larger_offsets", fsat__select=_tie_nudged_select(torch.abs))


def route_prefers_later_positions() -> Backend:
    t = _torch()

    def route(similarities, window, *, key_padding_mask=None):
        positions = torch.arange(similarities.shape[2], dtype=torch.float64)[:, None]
        return t.routing.route(similarities.double() + 1e-9 * positions, window, key_padding_mask=key_padding_mask)

    return wrapper(t, "route_prefers_later_positions", routing__route=route)


def route_puts_empty_slots_first() -> Backend:
    t = _torch()

    def route(similarities, window, *, key_padding_mask=None):
        return torch.sort(t.routing.route(similarities, window, key_padding_mask=key_padding_mask), dim=-1).values

    return wrapper(t, "route_puts_empty_slots_first", routing__route=route)


def assign_prefers_higher_index() -> Backend:
    t = _torch()

    def assign(x_hat, centroids, *, key_padding_mask=None):
        reversed_labels = t.routing.assign(x_hat, centroids.flip(1), key_padding_mask=key_padding_mask)
        return torch.where(reversed_labels >= 0, centroids.shape[1] - 1 - reversed_labels, reversed_labels)

    return wrapper(t, "assign_prefers_higher_index", routing__assign=assign)


def sparse_attention_autograd_drops_dbias() -> Backend:
    t = _torch()

    def sparse_attention(q, k, v, offsets, bias=None, *, causal=False, key_padding_mask=None):
        return t.fsat.sparse_attention(q, k, v, offsets, None if bias is None else bias.detach(), causal=causal,
                                       key_padding_mask=key_padding_mask)

    return wrapper(t, "sparse_attention_autograd_drops_dbias", fsat__sparse_attention=sparse_attention)


def fsat_attention_untruncated() -> Backend:
    """fsat.attention composed from cross, estimate, select and sparse_attention, without cutting the
    estimator's gradient from q and k (spec/fsat.md step 4): same forward, wrong autograd."""
    t = _torch()

    def attention(q, k, v, w, top_k, *, causal=False, key_padding_mask=None, noise=None, cross_q=None, cross_k=None):
        cd = _compute_dtype(q.dtype)
        a = (q if cross_q is None else cross_q).to(cd)
        b = (k if cross_k is None else cross_k).to(cd)
        s = t.fsat.estimate(t.fsat.cross(a, b, key_padding_mask=key_padding_mask), w.to(cd),
                            key_padding_mask=key_padding_mask)
        offsets = t.fsat.select(s, top_k, causal=causal, noise=noise)
        bias = torch.gather(s, 2, offsets + (q.shape[2] - 1))
        out, _ = t.fsat.sparse_attention(q.to(cd), k.to(cd), v.to(cd), offsets, bias, causal=causal,
                                         key_padding_mask=key_padding_mask)
        return out.to(q.dtype)

    return wrapper(t, "fsat_attention_untruncated", fsat__attention=attention)


def routing_attention_autograd_misses_k() -> Backend:
    t = _torch()

    def attention(q, k, v, centroids, **options):
        return t.routing.attention(q, None if k is None else k.detach(), v, centroids, **options)

    return wrapper(t, "routing_attention_autograd_misses_k", routing__attention=attention)


def cluster_attention_autograd_scales_gradient() -> Backend:
    t = _torch()

    def cluster_attention(*args, **kwargs):
        return _ScaledGradient.apply(t.routing.cluster_attention(*args, **kwargs), 1.5)

    return wrapper(t, "cluster_attention_autograd_scales_gradient", routing__cluster_attention=cluster_attention)


_gathered = {"on": False}


def gathered_shifts_pair_backwards() -> Backend:
    """Declares the torch backend's two shift strategies; its gathered path pairs row i with row
    i - tau instead of i + tau (the sparse attention of the negated offsets)."""
    t = _torch()

    @contextlib.contextmanager
    def force(strategy: Strategy) -> Iterator[None]:
        _gathered["on"] = strategy.name == "gathered"
        try:
            with strategy.force():
                yield
        finally:
            _gathered["on"] = False

    def flipped(offsets):
        return -offsets if _gathered["on"] else offsets

    def sparse_attention(q, k, v, offsets, bias=None, **options):
        return t.fsat.sparse_attention(q, k, v, flipped(offsets), bias, **options)

    def sparse_attention_vjp(q, k, v, offsets, bias, dout, **options):
        return t.fsat.sparse_attention_vjp(q, k, v, flipped(offsets), bias, dout, **options)

    strategies = tuple(Strategy(s.name, s.functions, lambda s=s: force(s), s.devices) for s in t.strategies)
    mutant = wrapper(t, "gathered_shifts_pair_backwards", fsat__sparse_attention=sparse_attention,
                     fsat__sparse_attention_vjp=sparse_attention_vjp)
    return dataclasses.replace(mutant, strategies=strategies)


class _SecondDevice(np.ndarray):
    """A NumPy array that stands for one on a backend's second device."""


def second_device(name: str = "second_device_wrong_cross", broken: bool = True) -> Backend:
    """The NumPy reference declaring two devices, "cpu" and "cpu:1"; on "cpu:1" (``broken``) its cross
    is off by one part in a thousand."""
    reference = backends.get_backend("numpy")

    def from_numpy(array, dtype=None, device="cpu"):
        array = reference.from_numpy(array, dtype, device)
        return array.view(_SecondDevice) if device == "cpu:1" else array

    def cross(a, b, **options):
        c = reference.fsat.cross(a, b, **options)
        return c * (1 + 1e-3) if broken and isinstance(a, _SecondDevice) else c

    mutant = wrapper(reference, name, fsat__cross=cross)
    return dataclasses.replace(mutant, from_numpy=from_numpy, to_numpy=lambda x: np.asarray(x).view(np.ndarray),
                               capabilities=Capabilities(dtypes=("float64",), devices=("cpu", "cpu:1")))


def _returning(dtype_for: Callable[[torch.Tensor], torch.dtype | None], function):
    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        first = next(a for a in args if isinstance(a, torch.Tensor))
        target = dtype_for(first)
        if target is None:
            return out
        return tuple(None if x is None else x.to(target) for x in out) if isinstance(out, tuple) else out.to(target)
    return wrapped


def sparse_attention_half_returns_float32() -> Backend:
    t = _torch()
    return wrapper(t, "sparse_attention_half_returns_float32", fsat__sparse_attention=_returning(
        lambda x: torch.float32 if x.dtype in HALF else None, t.fsat.sparse_attention))


def select_returns_int32() -> Backend:
    t = _torch()
    return wrapper(t, "select_returns_int32", fsat__select=_returning(lambda x: torch.int32, t.fsat.select))


def route_returns_int32() -> Backend:
    t = _torch()
    return wrapper(t, "route_returns_int32", routing__route=_returning(lambda x: torch.int32, t.routing.route))


def routing_attention_bfloat16_returns_float32() -> Backend:
    t = _torch()
    return wrapper(t, "routing_attention_bfloat16_returns_float32", routing__attention=_returning(
        lambda x: torch.float32 if x.dtype == torch.bfloat16 else None, t.routing.attention))


def lucidrains_self_logit_minus_1e4() -> Backend:
    t = _torch()

    def cluster_attention(q, k, v, q_members, k_members, *, causal=False, shared_qk=False, profile="tacl"):
        if profile == "lucidrains" and shared_qk:
            return _lucidrains_shared_cluster_attention(q, v, q_members, k_members, causal, -1e4)
        return t.routing.cluster_attention(q, k, v, q_members, k_members, causal=causal, shared_qk=shared_qk,
                                           profile=profile)

    return wrapper(t, "lucidrains_self_logit_minus_1e4", routing__cluster_attention=cluster_attention)


def sparse_attention_softmax_without_max() -> Backend:
    t = _torch()

    def sparse_attention(q, k, v, offsets, bias=None, *, causal=False, key_padding_mask=None):
        return _dense_sparse_attention(q, k, v, offsets, bias, causal, key_padding_mask, stable=False)

    return wrapper(t, "sparse_attention_softmax_without_max", fsat__sparse_attention=sparse_attention)


def local_attention_looks_back_two_blocks() -> Backend:
    t = _torch()

    def local_attention(q, k, v, block, *, causal=False, key_padding_mask=None):
        return _local_attention(q, k, v, block, causal, key_padding_mask, look_back=2)

    return wrapper(t, "local_attention_looks_back_two_blocks", routing__local_attention=local_attention)


def sparse_attention_second_tile_ignores_padding() -> Backend:
    """A kernel's second tile of 32 queries forgets the padding mask (rows 32 and on)."""
    t = _torch()

    def sparse_attention(q, k, v, offsets, bias=None, *, causal=False, key_padding_mask=None):
        out, lse = t.fsat.sparse_attention(q, k, v, offsets, bias, causal=causal, key_padding_mask=key_padding_mask)
        if key_padding_mask is None or q.shape[2] <= 32:
            return out, lse
        unmasked_out, unmasked_lse = t.fsat.sparse_attention(q, k, v, offsets, bias, causal=causal)
        return (torch.cat([out[:, :, :32], unmasked_out[:, :, 32:]], dim=2),
                torch.cat([lse[:, :, :32], unmasked_lse[:, :, 32:]], dim=2))

    return wrapper(t, "sparse_attention_second_tile_ignores_padding", fsat__sparse_attention=sparse_attention)


def local_attention_float16_accumulates_in_float16() -> Backend:
    """float16 logits q.k summed over the features in float16 (the rest in float32)."""
    t = _torch()

    def local_attention(q, k, v, block, *, causal=False, key_padding_mask=None):
        if q.dtype != torch.float16:
            return t.routing.local_attention(q, k, v, block, causal=causal, key_padding_mask=key_padding_mask)
        length = q.shape[2]
        positions = torch.arange(length)
        apart = (positions // block)[None, :] - (positions // block)[:, None]
        allowed = (apart >= -1) & (apart <= (0 if causal else 1))
        if causal:
            allowed = allowed & (positions[None, :] <= positions[:, None])
        allowed = allowed.expand(q.shape[0], q.shape[1], length, length)
        if key_padding_mask is not None:
            real = ~key_padding_mask
            allowed = allowed & real[:, None, :, None] & real[:, None, None, :]
        logits = _half_accumulated_logits(q, k) / math.sqrt(q.shape[3])
        out, _ = _masked_softmax_attention(logits, allowed, v.float())
        return out.to(q.dtype)

    return wrapper(t, "local_attention_float16_accumulates_in_float16", routing__local_attention=local_attention)


def commitment_loss_vjp_doubled_below_float64() -> Backend:
    t = _torch()

    def commitment_loss_vjp(x_hat, centroids, dloss=1.0, **options):
        grad = t.routing.commitment_loss_vjp(x_hat, centroids, dloss, **options)
        return grad if x_hat.dtype == torch.float64 else grad * 2

    return wrapper(t, "commitment_loss_vjp_doubled_below_float64", routing__commitment_loss_vjp=commitment_loss_vjp)


def tacl_combine_epsilon_1e3_in_bfloat16() -> Backend:
    t = _torch()

    def combine(o, q_members, length, *, profile="tacl"):
        out = t.routing.combine(o, q_members, length, profile=profile)
        if profile != "tacl" or o.dtype != torch.bfloat16:
            return out
        batch, heads = q_members.shape[:2]
        slots = q_members.reshape(batch, heads, -1)
        counts = torch.zeros(batch, heads, length, dtype=torch.float32)
        counts.scatter_add_(2, slots.clamp(min=0), (slots >= 0).float())
        return (out.float() * ((counts + 1e-2) / (counts + 1e-3))[..., None]).to(o.dtype)

    return wrapper(t, "tacl_combine_epsilon_1e3_in_bfloat16", routing__combine=combine)


def cross_vjp_swaps_gradients() -> Backend:
    t = _torch()

    def cross_vjp(a, b, dc, **options):
        da, db = t.fsat.cross_vjp(a, b, dc, **options)
        return db, da

    return wrapper(t, "cross_vjp_swaps_gradients", fsat__cross_vjp=cross_vjp)


def sparse_attention_vjp_ignores_dlse() -> Backend:
    t = _torch()

    def sparse_attention_vjp(q, k, v, offsets, bias, dout, *, dlse=None, **options):
        return t.fsat.sparse_attention_vjp(q, k, v, offsets, bias, dout, **options)

    return wrapper(t, "sparse_attention_vjp_ignores_dlse", fsat__sparse_attention_vjp=sparse_attention_vjp)


def causal_local_attention_sees_the_next_block() -> Backend:
    t = _torch()

    def local_attention(q, k, v, block, *, causal=False, key_padding_mask=None):
        return t.routing.local_attention(q, k, v, block, causal=False, key_padding_mask=key_padding_mask)

    return wrapper(t, "causal_local_attention_sees_the_next_block", routing__local_attention=local_attention)


def update_centroids_ignores_keys() -> Backend:
    t = _torch()

    def update_centroids(state, q_hat, k_hat=None, **options):
        return t.routing.update_centroids(state, q_hat, None, **options)

    return wrapper(t, "update_centroids_ignores_keys", routing__update_centroids=update_centroids)


MUTANTS = [
    Mutant("select_prefers_positive_offsets", "ties", ("fsat.select",), select_prefers_positive_offsets,
           "select: among equal scores, the positive offset (and then the larger |tau|) first"),
    Mutant("select_prefers_larger_offsets", "ties", ("fsat.select",), select_prefers_larger_offsets,
           "select: among equal scores, the larger |tau| first"),
    Mutant("route_prefers_later_positions", "ties", ("routing.route",), route_prefers_later_positions,
           "route: among equal similarities, the later position first"),
    Mutant("route_puts_empty_slots_first", "ties", ("routing.route",), route_puts_empty_slots_first,
           "route: the -1 slots first instead of last"),
    Mutant("assign_prefers_higher_index", "ties", ("routing.assign",), assign_prefers_higher_index,
           "assign: among equal similarities, the higher centroid index"),
    Mutant("sparse_attention_autograd_drops_dbias", "autograd", ("fsat.sparse_attention",),
           sparse_attention_autograd_drops_dbias, "sparse_attention: autograd gives the bias no gradient"),
    Mutant("fsat_attention_untruncated", "autograd", ("fsat.attention",), fsat_attention_untruncated,
           "fsat.attention: autograd lets the estimator's gradient reach q and k"),
    Mutant("routing_attention_autograd_misses_k", "autograd", ("routing.attention",),
           routing_attention_autograd_misses_k, "routing.attention: autograd gives k no gradient"),
    Mutant("cluster_attention_autograd_scales_gradient", "autograd", ("routing.cluster_attention",),
           cluster_attention_autograd_scales_gradient, "cluster_attention: autograd gradients 1.5 times too large"),
    Mutant("gathered_shifts_pair_backwards", "strategies", ("fsat.sparse_attention", "fsat.sparse_attention_vjp"),
           gathered_shifts_pair_backwards, "the gathered (GPU) shifts pair row i with i - tau"),
    Mutant("second_device_wrong_cross", "strategies", ("fsat.cross",), second_device,
           "cross is off by 1e-3 relative on the second declared device"),
    Mutant("sparse_attention_half_returns_float32", "dtypes", ("fsat.sparse_attention",),
           sparse_attention_half_returns_float32, "sparse_attention returns float32 for half-precision inputs"),
    Mutant("select_returns_int32", "dtypes", ("fsat.select",), select_returns_int32, "select returns int32 offsets"),
    Mutant("route_returns_int32", "dtypes", ("routing.route",), route_returns_int32, "route returns int32 members"),
    Mutant("routing_attention_bfloat16_returns_float32", "dtypes", ("routing.attention",),
           routing_attention_bfloat16_returns_float32, "routing.attention returns float32 for bfloat16 inputs"),
    Mutant("lucidrains_self_logit_minus_1e4", "extreme", ("routing.cluster_attention",),
           lucidrains_self_logit_minus_1e4, "lucidrains shared QK: the self logit is -1e4, not -5e4"),
    Mutant("sparse_attention_softmax_without_max", "extreme", ("fsat.sparse_attention",),
           sparse_attention_softmax_without_max, "sparse_attention: softmax without subtracting the maximum"),
    Mutant("local_attention_looks_back_two_blocks", "shapes", ("routing.local_attention",),
           local_attention_looks_back_two_blocks, "local attention: two blocks back instead of one"),
    Mutant("sparse_attention_second_tile_ignores_padding", "shapes", ("fsat.sparse_attention",),
           sparse_attention_second_tile_ignores_padding, "sparse_attention: rows 32 and on ignore the padding",
           large=True),
    Mutant("local_attention_float16_accumulates_in_float16", "tolerances", ("routing.local_attention",),
           local_attention_float16_accumulates_in_float16, "local attention: float16 logits summed in float16"),
    Mutant("commitment_loss_vjp_doubled_below_float64", "tolerances", ("routing.commitment_loss_vjp",),
           commitment_loss_vjp_doubled_below_float64, "commitment_loss_vjp twice too large except in float64"),
    Mutant("tacl_combine_epsilon_1e3_in_bfloat16", "tolerances", ("routing.combine",),
           tacl_combine_epsilon_1e3_in_bfloat16, "combine (tacl, bfloat16): epsilon 1e-3 instead of 1e-2"),
    Mutant("cross_vjp_swaps_gradients", "classic", ("fsat.cross_vjp",), cross_vjp_swaps_gradients,
           "cross_vjp returns (db, da)"),
    Mutant("sparse_attention_vjp_ignores_dlse", "classic", ("fsat.sparse_attention_vjp",),
           sparse_attention_vjp_ignores_dlse, "sparse_attention_vjp ignores the lse cotangent"),
    Mutant("causal_local_attention_sees_the_next_block", "classic", ("routing.local_attention",),
           causal_local_attention_sees_the_next_block, "causal local attention also sees the next block"),
    Mutant("update_centroids_ignores_keys", "classic", ("routing.update_centroids",), update_centroids_ignores_keys,
           "update_centroids ignores k_hat"),
]


def unmutated() -> list[Backend]:
    """The wrappers with nothing replaced: the torch one, and the two-device NumPy one."""
    return [wrapper(_torch(), "torch_wrapper"), second_device("numpy_two_devices", broken=False)]
