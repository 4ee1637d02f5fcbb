"""Routing attention on PyTorch tensors: the ``routing`` namespace of spec/interface.md, with autograd.

Every function mirrors the NumPy reference :mod:`refattn.routing` (same names, keywords, defaults,
shapes and tie-breaks; spec/routing.md defines the algorithm) on tensors of one device (CPU or
CUDA). float64 and float32 inputs are computed in their own dtype; float16 and bfloat16 inputs are
computed in float32 (similarities, softmax, reductions) and the results cast back to the input
dtype. Members and assignments are int64.

Vectorised throughout, with no Python loop over clusters or positions and no L x L array:

- ``route``: per centroid the W-th largest similarity θ (``torch.topk``), then every token above θ
  and, in position order, as many tokens equal to θ as are still needed (a cumulative sum); the
  chosen positions are compacted in position order with one ``scatter``. This is the reference's
  exact rule (ties to the lower position), O(L) per centroid besides the top-k.
- ``cluster_attention``: gather the members' features into (B, H, C, W, ·), one batched matmul for
  the (B, H, C, Wq, Wk) logits, position-based masks, softmax, matmul with the gathered values.
- ``combine``: ``scatter_add`` of the slot outputs and of the slot counts into (B, H, L, ·).
- ``local_attention``: blocks of B queries against the keys of the previous, own (and, not causal,
  next) block: (B, H, L/B, B, 2B or 3B) logits.

Autograd: ``attention``, ``cluster_attention``, ``combine``, ``local_attention``, ``normalize``,
``similarity`` and ``commitment_loss`` are differentiable with plain autograd through gather,
matmul and scatter (the cluster logits are O(L^1.5) per (batch, head), so recomputing them in a
hand-written backward would save little). Membership is discrete: routing runs on detached
tensors, so no gradient reaches the similarities or the centroids through it. The ``*_vjp``
functions return the same gradients explicitly, as the reference's do.

Additions to the interface (spec/interface.md allows additions, not renames):

- ``init_centroids`` takes a ``torch.Generator`` (draws ``torch.randn``) or, for numbers identical
  to the reference, a ``numpy.random.Generator``; keywords ``dtype`` and ``device`` choose the
  tensors' dtype (default ``torch.get_default_dtype()``) and device (default the generator's).
- ``centroid_statistics`` and ``apply_centroid_statistics`` split ``update_centroids`` into the
  per-batch sufficient statistics (counts and sums, which can be summed across data-parallel
  ranks) and the update itself; ``update_centroids(state, ...)`` is exactly
  ``apply_centroid_statistics(state, centroid_statistics(state, ...))``.
- ``commitment_loss`` returns a 0-d tensor (differentiable in ``x_hat``) instead of a Python float;
  for float16/bfloat16 inputs it is float32, the accumulation dtype (a scalar loss gains nothing
  from being rounded to half precision, and NumPy cannot hold a bfloat16 scalar).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from refattn.checks import centroid_array, flag, real_number, shared_keys
from refattn.routing import CentroidState
from refattn.routing.attention import default_num_clusters, default_window
from refattn.routing.profiles import Profile, check_configuration, get_profile

from . import _checks as chk

__all__ = [
    "CentroidState",
    "apply_centroid_statistics",
    "assign",
    "attention",
    "attention_vjp",
    "centroid_statistics",
    "cluster_attention",
    "cluster_attention_vjp",
    "combine",
    "combine_vjp",
    "commitment_loss",
    "commitment_loss_vjp",
    "default_num_clusters",
    "default_window",
    "init_centroids",
    "local_attention",
    "local_attention_vjp",
    "normalize",
    "normalize_vjp",
    "route",
    "similarity",
    "similarity_vjp",
    "update_centroids",
]

_NEG_INF = float("-inf")
_ROUTE_CHUNK_ELEMENTS = 1 << 24  # (B * H * clusters * L) entries per chunk of centroids in route


# --------------------------------------------------------------------------------------------
# input checks particular to routing (the shared ones are in _checks)
# --------------------------------------------------------------------------------------------


def _profile(profile: Any) -> Profile:
    return get_profile(profile)


def _centroids(centroids: Any, heads: int | None, dim: int | None, name: str = "centroids") -> torch.Tensor:
    return centroid_array(chk.tensor(centroids, name), heads, dim, name)


def _members(members: Any, name: str, batch: int, heads: int, length: int) -> torch.Tensor:
    members = chk.index_tensor(members, name, rank=4, axes="(B, H, C, W)")
    chk.expect_shape(members, name, (batch, heads, None, None), "(B, H, C, W)")
    if 0 in members.shape:
        raise ValueError(
            f"{name}: expected every axis of (B, H, C, W) to be at least 1, got shape {tuple(members.shape)}")
    if chk.checking_values(members):
        low, high = int(members.min()), int(members.max())
        if low < -1 or high >= length:
            raise ValueError(
                f"{name}: expected positions in [0, L) = [0, {length}) or -1 for an empty slot, "
                f"got values in [{low}, {high}]"
            )
        ordered = members.sort(dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise ValueError(f"{name}: expected distinct positions within each cluster, got a repeated position")
    return members


def _any_rank(x: Any, name: str) -> torch.Tensor:
    x = chk.float_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{name}: expected a tensor whose last axis (D) has at least 1 entry, got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------
# step 1: normalize
# --------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor, profile: Profile) -> torch.Tensor:
    """The profile's normalization over the last axis (compute-dtype tensor, no checks)."""
    if profile.norm == "layernorm":
        # (x - mean) / sqrt(biased variance + eps), no affine: exactly torch's fused layer_norm
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=profile.norm_eps)
    # vector_norm's backward is 0 (not NaN) at a zero row; the clamp makes dx = dy / eps there
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp(min=profile.norm_eps)


def normalize(x: Any, *, profile: str = "tacl") -> torch.Tensor:
    """The profile's normalization of every row over its last axis (reference: ``refattn.routing.normalize``).

    ``tacl``: x̂ = (x - mean) / sqrt(var + 1e-6) (LayerNorm, no affine); ``lucidrains``:
    x̂ = x / max(||x||, 1e-12). Any rank >= 1; differentiable; returns x's dtype.
    """
    profile = _profile(profile)
    x = _any_rank(x, "x")
    return _normalize(x.to(chk.compute_dtype(x.dtype)), profile).to(x.dtype)


def _vjp(function, inputs: Sequence[torch.Tensor],
         cotangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``function(*inputs)`` (a tensor or tuple of tensors) against the cotangents."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        outputs = function(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if c is not None and o.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(x) for x in leaves)
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True))


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> torch.Tensor:
    """VJP of :func:`normalize`: dx of x's shape and dtype."""
    profile = _profile(profile)
    chk.same_device(x=x, dx_hat=dx_hat)
    x = _any_rank(x, "x")
    dy = chk.float_tensor(dx_hat, "dx_hat")
    chk.expect_shape(dy, "dx_hat", tuple(x.shape), "like x")
    cd = chk.compute_dtype(x.dtype)
    (dx,) = _vjp(lambda a: _normalize(a, profile), [x.to(cd)], [dy.to(cd)])
    return dx.to(x.dtype)


# --------------------------------------------------------------------------------------------
# step 2: similarity
# --------------------------------------------------------------------------------------------


def _similarity(x_hat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """S = x̂ μᵀ per head: (B, H, L, D) x (H, C, D) -> (B, H, L, C)."""
    return torch.matmul(x_hat, centroids.transpose(-1, -2).unsqueeze(0))


def _check_similarity(x_hat: Any, centroids: Any) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    x_hat = chk.sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = _centroids(centroids, x_hat.shape[1], x_hat.shape[3])
    # the centroids may be kept in a wider dtype than the tokens (a layer's float32 state under
    # bfloat16 autocast): both are computed in the wider of the two compute dtypes
    return x_hat, centroids, torch.promote_types(chk.compute_dtype(x_hat.dtype), chk.compute_dtype(centroids.dtype))


def similarity(x_hat: Any, centroids: Any) -> torch.Tensor:
    """S[b, h, t, c] = x̂[b, h, t] · μ[h, c]: (B, H, L, C), differentiable in both inputs."""
    chk.same_device(x_hat=x_hat, centroids=centroids)
    x_hat, centroids, cd = _check_similarity(x_hat, centroids)
    return _similarity(x_hat.to(cd), centroids.to(cd)).to(x_hat.dtype)


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """VJP of :func:`similarity`: (dx_hat (B, H, L, D), dcentroids (H, C, D))."""
    chk.same_device(x_hat=x_hat, centroids=centroids, ds=ds)
    x_hat, centroids, cd = _check_similarity(x_hat, centroids)
    ds = chk.float_tensor(ds, "ds", rank=4, axes="(B, H, L, C)")
    chk.expect_shape(ds, "ds", tuple(x_hat.shape[:3]) + (centroids.shape[1],), "(B, H, L, C)")
    ds, xc, mc = ds.to(cd), x_hat.to(cd), centroids.to(cd)
    dx_hat = torch.matmul(ds, mc.unsqueeze(0))
    dcentroids = torch.matmul(ds.transpose(-1, -2), xc).sum(dim=0)
    return dx_hat.to(x_hat.dtype), dcentroids.to(centroids.dtype)


# --------------------------------------------------------------------------------------------
# step 3: route
# --------------------------------------------------------------------------------------------


def _route_rows(scores: torch.Tensor, window: int, padded: torch.Tensor | None) -> torch.Tensor:
    """Members (..., W) of rows of scores (..., L); ``padded`` broadcastable bool or None.

    θ = the W-th largest score of the row (``topk``). When no row has a token equal to θ left out
    of its top W (exactly W scores >= θ, the case of continuous data), the top-W indices are the
    members and only need sorting by position. Otherwise the exact tie rule decides:
    :func:`_route_rows_with_ties`. Under ``torch.compile`` the tie rule always decides (the test
    reads tensor values, a graph break, and the compiled tie rule is fused anyway).
    """
    if padded is not None:
        scores = scores.masked_fill(padded, _NEG_INF)
    top = torch.topk(scores, window, dim=-1, sorted=True)
    threshold = top.values[..., window - 1 :]
    if not torch.compiler.is_compiling():
        unique = ((scores >= threshold).sum(dim=-1) == window).all() & torch.isfinite(threshold).all()
        if bool(unique):
            return torch.sort(top.indices, dim=-1).values
    return _route_rows_with_ties(scores, window, threshold, padded)


def _route_rows_with_ties(scores: torch.Tensor, window: int, threshold: torch.Tensor,
                          padded: torch.Tensor | None) -> torch.Tensor:
    """The exact tie rule: every token above θ and, in position order, as many tokens equal to θ as
    are still needed (padded tokens never). ``taken`` (the running count of taken tokens along the
    row) is non-decreasing, so the position of the j-th taken token is the first index where it
    reaches j + 1: one ``searchsorted`` per row, no compaction by scatter.
    """
    length = scores.shape[-1]
    above = scores > threshold
    tied = scores == threshold
    if padded is not None:
        tied = tied & ~padded  # fewer than W unpadded tokens: the threshold is -inf, as are the padded
    still_needed = window - above.sum(dim=-1, keepdim=True)
    taken = torch.cumsum(above, dim=-1) + torch.minimum(torch.cumsum(tied, dim=-1), still_needed)
    wanted = torch.arange(1, window + 1, device=scores.device).expand(scores.shape[:-1] + (window,))
    members = torch.searchsorted(taken.contiguous(), wanted.contiguous())
    return torch.where(members < length, members, -1)


def _route(similarities: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """members (B, H, C, W) int64 from S (B, H, L, C) (no checks, no gradient)."""
    return _route_by_centroid(similarities.detach().transpose(-1, -2), window, mask)


def _route_by_centroid(scores: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """members (B, H, C, W) int64 from the transposed similarities (B, H, C, L); chunks of centroids
    bound the (chunk, L) temporaries."""
    batch, heads, clusters, length = scores.shape
    scores = scores.detach().contiguous()
    padded = None if mask is None else mask[:, None, None, :]
    chunk = max(1, _ROUTE_CHUNK_ELEMENTS // max(1, batch * heads * length))
    if chunk >= clusters:
        return _route_rows(scores, window, padded)
    parts = [_route_rows(scores[:, :, c0 : c0 + chunk], window, padded) for c0 in range(0, clusters, chunk)]
    return torch.cat(parts, dim=2)


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> torch.Tensor:
    """Balanced membership: per centroid the ``window`` unpadded tokens of largest similarity.

    members[b, h, c] lists them in increasing position; ties go to the lower position; when fewer
    than W tokens are unpadded, the remaining slots hold -1, at the end. S (B, H, L, C) finite
    floats -> (B, H, C, W) int64 on S's device. No gradient.
    """
    chk.same_device(similarities=similarities, key_padding_mask=key_padding_mask)
    scores = chk.float_tensor(similarities, "similarities", rank=4, axes="(B, H, L, C)")
    batch, heads, length, clusters = scores.shape
    if 0 in scores.shape:
        raise ValueError(
            f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {tuple(scores.shape)}")
    window = chk.integer_in_range(window, "window", low=1, high=length)
    mask = chk.padding_mask(key_padding_mask, batch, length)
    return _route(scores.to(chk.compute_dtype(scores.dtype)), window, mask)


# --------------------------------------------------------------------------------------------
# step 4: cluster attention
# --------------------------------------------------------------------------------------------


def _flat_rows(members: torch.Tensor, length: int) -> torch.Tensor:
    """Row numbers into a (B * H * L, F) view for members (B, H, C, W), flattened; empty slots -> row 0
    of their (b, h) (callers give them weight 0)."""
    batch, heads = members.shape[:2]
    base = torch.arange(batch * heads, device=members.device).reshape(batch, heads, 1, 1) * length
    return (base + members.clamp(min=0)).reshape(-1)


def _all_slots_filled(*memberships: torch.Tensor) -> bool:
    """No empty slot (-1) in any of the memberships; always False under ``torch.compile`` (reading
    the answer is a graph break, and the compiled masked path is fused anyway)."""
    if torch.compiler.is_compiling():
        return False
    return all(bool((members >= 0).all()) for members in memberships)


def _add_rows(total_rows: int, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[rows[i]] += values[i] into zeros (total_rows, F): ``index_put_`` with accumulation, several
    times faster than ``index_add_`` on a CPU (which pays a per-row dispatch)."""
    out = torch.zeros(total_rows, values.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_put_((rows,), values, accumulate=True)


class _GatherRows(torch.autograd.Function):
    """y = x[rows] for x (N, F) (``index_select``); its backward adds the rows back with :func:`_add_rows`."""

    @staticmethod
    def forward(ctx, x, rows):  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.total_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return _add_rows(ctx.total_rows, rows, dy), None


def _gather(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, F) -> (B, H, C, W, F), the rows of the members (empty slots: an arbitrary row)."""
    batch, heads, length, features = x.shape
    rows = _GatherRows.apply(x.reshape(batch * heads * length, features), _flat_rows(members, length))
    return rows.reshape(members.shape + (features,))


def _scatter_add(values: torch.Tensor, members: torch.Tensor, length: int) -> torch.Tensor:
    """Sum values (B, H, C, W, F) into (B, H, L, F) at the members' positions; empty slots dropped."""
    batch, heads, clusters, window, features = values.shape
    if not _all_slots_filled(members):
        filled = (members >= 0).unsqueeze(-1)
        values = torch.where(filled, values, torch.zeros((), dtype=values.dtype, device=values.device))
    out = _add_rows(batch * heads * length, _flat_rows(members, length), values.reshape(-1, features))
    return out.reshape(batch, heads, length, features)


def _softmax_rows(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``valid``; rows without a valid entry are all 0.

    Invalid logits are set to the dtype's lowest finite value instead of -inf, so the fused softmax
    never sees a row of -inf (NaN): in a row with a valid entry, exp(lowest - max) is exactly 0, the
    weight a -inf logit gets; a row without one comes out uniform and is multiplied by 0.
    """
    lowest = torch.finfo(logits.dtype).min
    weights = torch.softmax(logits.masked_fill(~valid, lowest), dim=-1)
    return weights * valid.any(dim=-1, keepdim=True).to(weights.dtype)


def _features(q: torch.Tensor, k: torch.Tensor | None, profile: Profile,
              shared_qk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if profile.logits_use_normalized:
        f_q = _normalize(q, profile)
        f_k = f_q if shared_qk else _normalize(k, profile)
    else:
        f_q = q
        f_k = _normalize(q, profile) if shared_qk else k
    return f_q, f_k


def _cluster_attention(q, k, v, q_members, k_members, causal: bool, shared_qk: bool, profile: Profile) -> torch.Tensor:
    """o (B, H, C, Wq, Dv) for compute-dtype tensors (no checks); differentiable in q, k, v."""
    f_q, f_k = _features(q, k, profile, shared_qk)
    return _attend(f_q, f_k, v, q_members, k_members, causal, shared_qk, profile)


def _attend(f_q, f_k, v, q_members, k_members, causal: bool, shared_qk: bool, profile: Profile) -> torch.Tensor:
    """Attention inside the clusters from the logit features f_q, f_k (B, H, L, D)."""
    if profile.scaled_logits:  # scale the L x D queries, not the C x W x W logits
        f_q = f_q * (1.0 / math.sqrt(f_q.shape[-1]))
    fq, fk, vg = _gather(f_q, q_members), _gather(f_k, k_members), _gather(v, k_members)
    logits = torch.matmul(fq, fk.transpose(-1, -2))  # (B, H, C, Wq, Wk)
    if not causal and not (shared_qk and profile.self_logit is not None) and _all_slots_filled(q_members, k_members):
        return torch.matmul(torch.softmax(logits, dim=-1), vg)  # nothing to mask
    qpos, kpos = q_members.unsqueeze(-1), k_members.unsqueeze(-2)
    valid = (qpos >= 0) & (kpos >= 0)
    if causal:
        valid = valid & (kpos <= qpos)
    if shared_qk and profile.self_logit is not None:
        fixed = valid & (kpos == qpos)
        logits = logits.masked_fill(fixed, profile.self_logit)
    return torch.matmul(_softmax_rows(logits, valid), vg)


def _check_cluster(q, k, v, q_members, k_members, causal, shared_qk, profile):
    profile = _profile(profile)
    causal, shared_qk = flag(causal, "causal"), flag(shared_qk, "shared_qk")
    chk.same_device(q=q, k=k, v=v, q_members=q_members, k_members=k_members)
    shared_keys(k, shared_qk)
    check_configuration(profile, causal, shared_qk)
    q = chk.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if k is not None:
        k = chk.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = chk.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    chk.same_dtype(q=q, k=k, v=v)
    q_members = _members(q_members, "q_members", batch, heads, length)
    k_members = _members(k_members, "k_members", batch, heads, length)
    if k_members.shape[2] != q_members.shape[2]:
        raise ValueError(
            f"k_members: expected the same number of clusters C = {q_members.shape[2]} as q_members, "
            f"got shape {tuple(k_members.shape)}"
        )
    return q, k, v, q_members, k_members, causal, shared_qk, profile


def cluster_attention(
    q: Any,
    k: Any,
    v: Any,
    q_members: Any,
    k_members: Any,
    *,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
) -> torch.Tensor:
    """Dense attention of each cluster's query members to its valid key members.

    Takes the raw q, k (None with shared QK) and v and applies the profile's normalization and
    logit scale itself; causal by position; masked logits -inf; a query with no valid key (and an
    empty query slot) outputs 0. Returns o (B, H, C, Wq, Dv) of q's dtype, differentiable in q, k, v.
    """
    q, k, v, qm, km, causal, shared_qk, profile = _check_cluster(q, k, v, q_members, k_members, causal, shared_qk,
                                                                 profile)
    cd = chk.compute_dtype(q.dtype)
    o = _cluster_attention(q.to(cd), None if k is None else k.to(cd), v.to(cd), qm, km, causal, shared_qk, profile)
    return o.to(q.dtype)


def cluster_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    q_members: Any,
    k_members: Any,
    do: Any,
    *,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """VJP of :func:`cluster_attention` (membership fixed): (dq, dk, dv) of the inputs' (B, H, L, ·)
    shapes; dk is None with shared QK; positions in no cluster get 0."""
    chk.same_device(q=q, do=do)
    q, k, v, qm, km, causal, shared_qk, profile = _check_cluster(q, k, v, q_members, k_members, causal, shared_qk,
                                                                 profile)
    do = chk.float_tensor(do, "do", rank=5, axes="(B, H, C, W, Dv)")
    chk.expect_shape(do, "do", tuple(qm.shape) + (v.shape[3],), "(B, H, C, W, Dv)")
    cd = chk.compute_dtype(q.dtype)
    if shared_qk:
        dq, dv = _vjp(lambda a, c: _cluster_attention(a, None, c, qm, km, causal, True, profile), [q.to(cd), v.to(cd)],
                      [do.to(cd)])
        return dq.to(q.dtype), None, dv.to(v.dtype)
    dq, dk, dv = _vjp(lambda a, b, c: _cluster_attention(a, b, c, qm, km, causal, False, profile),
                      [q.to(cd), k.to(cd), v.to(cd)], [do.to(cd)])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------
# step 5: combine
# --------------------------------------------------------------------------------------------


def _member_counts(members: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """count[b, h, t], the number of slots holding t: (B, H, L) of ``dtype``."""
    batch, heads, clusters, window = members.shape
    filled = (members >= 0).reshape(batch, heads, clusters * window).to(dtype)
    index = members.clamp(min=0).reshape(batch, heads, clusters * window)
    return torch.zeros(batch, heads, length, dtype=dtype, device=members.device).scatter_add(2, index, filled)


def _combine(o: torch.Tensor, q_members: torch.Tensor, length: int, profile: Profile) -> torch.Tensor:
    total = _scatter_add(o, q_members, length)
    return total / (_member_counts(q_members, length, o.dtype) + profile.combine_eps).unsqueeze(-1)


def combine(o: Any, q_members: Any, length: int, *, profile: str = "tacl") -> torch.Tensor:
    """out[b, h, t] = Σ of the slot outputs o whose query member is t / (count_t + ε); ε = 1e-2
    (tacl) or 1e-5 (lucidrains). Tokens in no cluster output 0. (B, H, L, Dv), differentiable in o."""
    profile = _profile(profile)
    chk.same_device(o=o, q_members=q_members)
    length = chk.integer_in_range(length, "length", low=1)
    o = chk.float_tensor(o, "o", rank=5, axes="(B, H, C, W, Dv)")
    members = _members(q_members, "q_members", o.shape[0], o.shape[1], length)
    if tuple(members.shape) != tuple(o.shape[:4]):
        raise ValueError(
            f"q_members: expected shape (B, H, C, W) = {tuple(o.shape[:4])} (that of o), got {tuple(members.shape)}")
    return _combine(o.to(chk.compute_dtype(o.dtype)), members, length, profile).to(o.dtype)


def combine_vjp(q_members: Any, dout: Any, *, profile: str = "tacl") -> torch.Tensor:
    """VJP of :func:`combine`: do[b, h, c, w] = dout[b, h, t] / (count_t + ε), 0 at empty slots."""
    profile = _profile(profile)
    chk.same_device(q_members=q_members, dout=dout)
    dout = chk.float_tensor(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    batch, heads, length, _ = dout.shape
    members = _members(q_members, "q_members", batch, heads, length)
    cd = chk.compute_dtype(dout.dtype)
    scaled = dout.to(cd) / (_member_counts(members, length, cd) + profile.combine_eps).unsqueeze(-1)
    do = _gather(scaled, members)
    do = torch.where((members >= 0).unsqueeze(-1), do, torch.zeros((), dtype=cd, device=do.device))
    return do.to(dout.dtype)


# --------------------------------------------------------------------------------------------
# step 6: local attention
# --------------------------------------------------------------------------------------------


def _local_attention(q, k, v, block: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Blocked local attention for compute-dtype tensors (no checks); differentiable in q, k, v."""
    batch, heads, length, dim = q.shape
    device = q.device
    width = min(block, length)
    blocks = -(-length // width)
    total = blocks * width
    extra = total - length
    if extra:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
    queries = torch.arange(total, device=device).reshape(blocks, width)  # (N, B)
    parts = [queries - width, queries] if causal else [queries - width, queries, queries + width]
    keys = torch.cat(parts, dim=1)  # (N, 2B or 3B): the previous, own (and next) block
    key_index = keys.clamp(0, total - 1).reshape(-1)
    span = keys.shape[1]
    qb = q.reshape(batch, heads, blocks, width, dim)
    kb = k.index_select(2, key_index).reshape(batch, heads, blocks, span, dim)
    vb = v.index_select(2, key_index).reshape(batch, heads, blocks, span, v.shape[3])
    valid = ((keys >= 0) & (keys < length)).unsqueeze(1) & (queries < length).unsqueeze(-1)  # (N, B, span)
    if causal:
        valid = valid & (keys.unsqueeze(1) <= queries.unsqueeze(-1))
    valid = valid.unsqueeze(0).unsqueeze(0)  # (1, 1, N, B, span)
    if mask is not None:
        unpadded = torch.nn.functional.pad(~mask, (0, extra), value=False)  # (B, total)
        key_ok = unpadded.index_select(1, key_index).reshape(batch, blocks, span)
        query_ok = unpadded.reshape(batch, blocks, width)
        valid = valid & (key_ok.unsqueeze(2) & query_ok.unsqueeze(-1)).unsqueeze(1)
    logits = torch.matmul(qb, kb.transpose(-1, -2)) * (1.0 / math.sqrt(dim))
    out = torch.matmul(_softmax_rows(logits, valid), vb)
    return out.reshape(batch, heads, total, v.shape[3])[:, :, :length]


def _check_local(q, k, v, block, key_padding_mask):
    chk.same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    q = chk.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = chk.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = chk.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    chk.same_dtype(q=q, k=k, v=v)
    block = chk.integer_in_range(block, "block", low=1)
    mask = chk.padding_mask(key_padding_mask, batch, length)
    return q, k, v, block, mask


def local_attention(q: Any, k: Any, v: Any, block: int, *, causal: bool = False,
                    key_padding_mask: Any = None) -> torch.Tensor:
    """Blocked local attention (spec/routing.md, step 6): query i sees key j iff j's block is i's
    or the previous one (or the next one when not causal), j <= i when causal, neither padded;
    logits q·k/sqrt(D). (B, H, L, Dv), differentiable in q, k, v."""
    q, k, v, block, mask = _check_local(q, k, v, block, key_padding_mask)
    cd = chk.compute_dtype(q.dtype)
    return _local_attention(q.to(cd), k.to(cd), v.to(cd), block, flag(causal, "causal"), mask).to(q.dtype)


def local_attention_vjp(
    q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False, key_padding_mask: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VJP of :func:`local_attention`: (dq, dk, dv)."""
    chk.same_device(q=q, dout=dout)
    q, k, v, block, mask = _check_local(q, k, v, block, key_padding_mask)
    dout = chk.float_tensor(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    chk.expect_shape(dout, "dout", tuple(v.shape), "(B, H, L, Dv)")
    cd = chk.compute_dtype(q.dtype)
    dq, dk, dv = _vjp(lambda a, b, c: _local_attention(a, b, c, block, flag(causal, "causal"), mask),
                      [q.to(cd), k.to(cd), v.to(cd)], [dout.to(cd)])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------
# step 7: centroids
# --------------------------------------------------------------------------------------------


def _assign(x_hat: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L) int64 argmax_c x̂ · μ_c (first maximum: the lower index), -1 at padding."""
    labels = torch.argmax(_similarity(x_hat.detach(), centroids.detach()), dim=-1)
    if mask is not None:
        labels = labels.masked_fill(mask.unsqueeze(1), -1)
    return labels


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """Nearest centroid of every token by the largest x̂ · μ (ties: the lower index), -1 at
    padding: (B, H, L) int64."""
    chk.same_device(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    x_hat, centroids, cd = _check_similarity(x_hat, centroids)
    mask = chk.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    return _assign(x_hat.to(cd), centroids.to(cd), mask)


def init_centroids(
    num_heads: int,
    num_clusters: int,
    dim: int,
    *,
    rng: torch.Generator | np.random.Generator,
    profile: str = "tacl",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CentroidState:
    """Initial centroids: ``tacl`` means = LN(g), ``lucidrains`` means = g / ||g||, counts = 0,
    sums = means, with g (H, C, D) standard normal.

    ``rng``: a ``torch.Generator`` (one ``torch.randn`` draw, in float64, on the generator's device)
    or a ``numpy.random.Generator`` (one ``standard_normal`` call: the reference's numbers exactly).
    ``dtype`` (default ``torch.get_default_dtype()``) and ``device`` (default the generator's, CPU
    for NumPy) choose where the state lives. Nothing else is drawn.
    """
    profile = _profile(profile)
    heads = chk.integer_in_range(num_heads, "num_heads", low=1)
    clusters = chk.integer_in_range(num_clusters, "num_clusters", low=1)
    dim = chk.integer_in_range(dim, "dim", low=1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if isinstance(rng, torch.Generator):
        draw = torch.randn((heads, clusters, dim), generator=rng, dtype=torch.float64, device=rng.device)
    elif isinstance(rng, np.random.Generator):
        draw = torch.from_numpy(rng.standard_normal((heads, clusters, dim)))
    else:
        raise TypeError(f"rng: expected a torch.Generator or a numpy.random.Generator, got {type(rng).__name__}")
    means = _normalize(draw, profile).to(device=device if device is not None else draw.device, dtype=dtype)
    counts = torch.zeros((heads, clusters), dtype=dtype, device=means.device)
    return CentroidState(means, counts, means.clone())


def _state(state: Any) -> CentroidState:
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    chk.same_device(**{"state.means": state[0], "state.counts": state[1], "state.sums": state[2]})
    means = _centroids(state[0], None, None, "state.means")
    heads, clusters, dim = means.shape
    counts = chk.float_tensor(state[1], "state.counts", rank=2, axes="(H, C)")
    chk.expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
    sums = chk.float_tensor(state[2], "state.sums", rank=3, axes="(H, C, D)")
    chk.expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
    return CentroidState(means, counts, sums)


def _statistics(x_hat: torch.Tensor, means: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: N_c (H, C) tokens whose nearest centroid is c, S_c (H, C, D) their sum (padding excluded)."""
    heads, clusters, dim = means.shape
    labels = _assign(x_hat, means, mask)  # (B, H, L)
    keep = labels >= 0
    head = torch.arange(heads, device=labels.device).reshape(1, heads, 1)
    flat = (head * clusters + labels.clamp(min=0)).reshape(-1)
    weight = keep.reshape(-1).to(means.dtype)
    counts = torch.zeros(heads * clusters, dtype=means.dtype, device=means.device).scatter_add(0, flat, weight)
    rows = x_hat.detach().to(means.dtype).reshape(-1, dim) * weight.unsqueeze(-1)
    sums = torch.zeros(heads * clusters, dim, dtype=means.dtype, device=means.device).index_add(0, flat, rows)
    return counts.reshape(heads, clusters), sums.reshape(heads, clusters, dim)


def centroid_statistics(
    state: CentroidState, q_hat: Any, k_hat: Any = None, *, key_padding_mask: Any = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The batch's sufficient statistics for :func:`apply_centroid_statistics`.

    For x in (q̂, then k̂ when given), per head, under the *incoming* means: (N (H, C), S (H, C, D)),
    the number and the sum of the unpadded tokens whose nearest centroid is c. They are sums over
    the batch, so data-parallel ranks can ``all_reduce`` them (SUM) and every rank then applies the
    update of the concatenated batch. Computed in the compute dtype of the state and the inputs.
    """
    chk.same_device(q_hat=q_hat, k_hat=k_hat, key_padding_mask=key_padding_mask,
                    means=state[0] if isinstance(state, tuple) and state else None)
    state = _state(state)
    heads, clusters, dim = state.means.shape
    q_hat = chk.sequence(q_hat, "q_hat", "(B, H, L, D)")
    chk.expect_shape(q_hat, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
    batch, _, length, _ = q_hat.shape
    inputs = [q_hat]
    if k_hat is not None:
        inputs.append(chk.sequence(k_hat, "k_hat", "(B, H, L, D)", (batch, heads, length), feature=dim))
    mask = chk.padding_mask(key_padding_mask, batch, length)
    cd = torch.promote_types(chk.compute_dtype(state.means.dtype), chk.compute_dtype(q_hat.dtype))
    means = state.means.to(cd)
    return tuple(_statistics(x.to(cd), means, mask) for x in inputs)


def _apply(state: CentroidState, statistics, profile: Profile, decay: float) -> CentroidState:
    cd = statistics[0][0].dtype if statistics else chk.compute_dtype(state.means.dtype)
    means, counts, sums = (x.to(cd) for x in state)
    clusters = means.shape[1]
    if profile.update == "vqvae_ema":
        for batch_counts, batch_sums in statistics:
            counts = decay * counts + (1.0 - decay) * batch_counts.to(cd)
            sums = decay * sums + (1.0 - decay) * batch_sums.to(cd)
        total = counts.sum(dim=-1, keepdim=True)
        smoothed = (counts + profile.laplace_eps) / (total + clusters * profile.laplace_eps) * total
        safe = torch.where(smoothed > 0, smoothed, torch.ones((), dtype=cd, device=smoothed.device))
        new_means = torch.where((total > 0).unsqueeze(-1), sums / safe.unsqueeze(-1), means)
    else:
        batch_counts = sum(c.to(cd) for c, _ in statistics)
        batch_sums = sum(s.to(cd) for _, s in statistics)
        norm = torch.linalg.vector_norm(batch_sums, dim=-1, keepdim=True)
        batch_means = torch.where((batch_counts > 0).unsqueeze(-1), batch_sums / norm.clamp(min=profile.norm_eps),
                                  means)
        new_means = decay * means + (1.0 - decay) * batch_means
    return CentroidState(new_means.to(state.means.dtype), counts.to(state.counts.dtype), sums.to(state.sums.dtype))


def apply_centroid_statistics(
    state: CentroidState,
    statistics: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    profile: str = "tacl",
    decay: float = 0.999,
) -> CentroidState:
    """The k-means update of :func:`update_centroids` from (possibly all-reduced) statistics.

    ``statistics``: the (N, S) pairs of :func:`centroid_statistics`, queries first, then keys.
    ``tacl``: one EMA step of counts and sums per pair, then means = sums / Laplace-smoothed counts
    (kept when nothing has ever been counted). ``lucidrains``: m_c = normalize(Σ of the pairs' S_c)
    (μ_c when no token chose c), means <- λ means + (1 - λ) m; counts and sums unchanged. Returns a
    new state of the incoming state's dtypes.
    """
    profile = _profile(profile)
    state = _state(state)
    decay = real_number(decay, "decay", low=0.0, high=1.0)
    heads, clusters, dim = state.means.shape
    pairs = []
    for i, pair in enumerate(statistics):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"statistics[{i}]: expected a (counts, sums) pair, got {type(pair).__name__}")
        counts = chk.float_tensor(pair[0], f"statistics[{i}].counts", rank=2, axes="(H, C)")
        chk.expect_shape(counts, f"statistics[{i}].counts", (heads, clusters), "(H, C)")
        sums = chk.float_tensor(pair[1], f"statistics[{i}].sums", rank=3, axes="(H, C, D)")
        chk.expect_shape(sums, f"statistics[{i}].sums", (heads, clusters, dim), "(H, C, D)")
        pairs.append((counts, sums))
    if not pairs:
        raise ValueError("statistics: expected at least one (counts, sums) pair, got none")
    cd = torch.promote_types(chk.compute_dtype(state.means.dtype), chk.compute_dtype(pairs[0][1].dtype))
    pairs = [(c.to(cd), s.to(cd)) for c, s in pairs]
    return _apply(state, pairs, profile, decay)


def update_centroids(
    state: CentroidState,
    q_hat: Any,
    k_hat: Any = None,
    *,
    profile: str = "tacl",
    key_padding_mask: Any = None,
    decay: float = 0.999,
) -> CentroidState:
    """One k-means step from a batch of normalized queries (and keys); returns a new state
    (functional: the incoming tensors are not modified). ``tacl``: VQ-VAE EMA of counts and sums,
    queries then keys, both assigned under the incoming means, Laplace ε = 1e-5. ``lucidrains``:
    spherical batch mean of q̂ and k̂ together, empty clusters keep μ, EMA of the means. Padding is
    excluded. No gradient."""
    profile = _profile(profile)
    decay = real_number(decay, "decay", low=0.0, high=1.0)
    statistics = centroid_statistics(state, q_hat, k_hat, key_padding_mask=key_padding_mask)
    return _apply(_state(state), statistics, profile, decay)


# --------------------------------------------------------------------------------------------
# step 8: commitment loss
# --------------------------------------------------------------------------------------------


def _residual(x_hat: torch.Tensor, centroids: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ - μ_a, 0 at padding) with μ a constant, and N·D as a tensor."""
    labels = _assign(x_hat, centroids, mask)
    keep = labels >= 0
    heads = centroids.shape[0]
    chosen = centroids.detach()[torch.arange(heads, device=labels.device).reshape(1, heads, 1), labels.clamp(min=0)]
    residual = torch.where(keep.unsqueeze(-1), x_hat - chosen, torch.zeros((), dtype=x_hat.dtype, device=x_hat.device))
    return residual, keep.sum() * x_hat.shape[-1]


def _commitment(x_hat: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None, beta: float) -> torch.Tensor:
    residual, count = _residual(x_hat, centroids, mask)
    total = (residual * residual).sum()
    return torch.where(count > 0, beta * total / count.clamp(min=1).to(total.dtype),
                       torch.zeros((), dtype=total.dtype, device=total.device))


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> torch.Tensor:
    """β / (N D) · Σ over the unpadded tokens of ||x̂ - μ_a(x̂)||² (0 with no unpadded token).

    A 0-d tensor, differentiable in ``x_hat`` (the centroids are a constant), in the accumulation
    dtype: float64/float32 for such inputs, float32 for float16/bfloat16 ones (the wider of the two
    when x_hat and the centroids differ).
    """
    beta = real_number(beta, "beta", low=0.0)
    chk.same_device(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    x_hat, centroids, cd = _check_similarity(x_hat, centroids)
    mask = chk.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    return _commitment(x_hat.to(cd), centroids.to(cd), mask, beta)


def commitment_loss_vjp(
    x_hat: Any, centroids: Any, dloss: Any = 1.0, *, beta: float = 1e-4, key_padding_mask: Any = None
) -> torch.Tensor:
    """Gradient of :func:`commitment_loss` in x̂: dloss · 2β (x̂ - μ_a) / (N D), 0 at padding."""
    beta = real_number(beta, "beta", low=0.0)
    chk.same_device(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    x_hat, centroids, cd = _check_similarity(x_hat, centroids)
    mask = chk.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    residual, count = _residual(x_hat.to(cd), centroids.to(cd), mask)
    if isinstance(dloss, torch.Tensor):
        dloss = dloss.to(device=residual.device, dtype=cd)
    scale = 2.0 * beta * dloss / count.clamp(min=1).to(cd)
    return (residual * scale).to(x_hat.dtype)


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


class _Routed(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor
    centroids: torch.Tensor
    window: int
    causal: bool
    shared_qk: bool
    profile: Profile
    mask: torch.Tensor | None


def _check_attention(q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask) -> _Routed:
    profile = _profile(profile)
    causal, shared_qk = flag(causal, "causal"), flag(shared_qk, "shared_qk")
    chk.same_device(q=q, k=k, v=v, centroids=centroids, key_padding_mask=key_padding_mask)
    shared_keys(k, shared_qk)
    check_configuration(profile, causal, shared_qk)
    q = chk.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if k is not None:
        k = chk.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = chk.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    chk.same_dtype(q=q, k=k, v=v)
    centroids = _centroids(centroids, heads, dim)
    if window is None:
        window = default_window(length, centroids.shape[1])
    window = chk.integer_in_range(window, "window", low=1, high=length)
    mask = chk.padding_mask(key_padding_mask, batch, length)
    return _Routed(q, k, v, centroids, window, causal, shared_qk, profile, mask)


def _routed_by(x_hat: torch.Tensor, centroids: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Members of normalized tokens: the similarities are formed as (B, H, C, L), the layout the
    per-centroid top-W reads, without a transpose copy."""
    with torch.no_grad():
        scores = torch.matmul(centroids.detach().unsqueeze(0), x_hat.detach().transpose(-1, -2))
        return _route_by_centroid(scores, window, mask)


def _attention(q, k, v, centroids, window: int, causal: bool, shared_qk: bool, profile: Profile, mask) -> torch.Tensor:
    """The pipeline on compute-dtype tensors (no checks); differentiable in q, k, v.

    The normalized q̂ (and k̂) are formed once: routed (detached) and, where the profile uses them,
    the logit features (tacl: q̂, k̂; lucidrains with shared QK: q̂ as the keys).
    """
    q_hat = _normalize(q, profile)
    k_hat = None if shared_qk else _normalize(k, profile)
    q_members = _routed_by(q_hat, centroids, window, mask)
    k_members = q_members if shared_qk else _routed_by(k_hat, centroids, window, mask)
    if profile.logits_use_normalized:
        f_q, f_k = q_hat, (q_hat if shared_qk else k_hat)
    else:
        f_q, f_k = q, (q_hat if shared_qk else k)
    o = _attend(f_q, f_k, v, q_members, k_members, causal, shared_qk, profile)
    return _combine(o, q_members, q.shape[2], profile)


def attention(
    q: Any,
    k: Any,
    v: Any,
    centroids: Any,
    *,
    window: int | None = None,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
    key_padding_mask: Any = None,
) -> torch.Tensor:
    """Routing attention (spec/routing.md): normalize -> similarity -> route (top-W per centroid)
    -> cluster attention -> combine.

    q (B, H, L, D); k (B, H, L, D) or None with ``shared_qk``; v (B, H, L, Dv); centroids (H, C, D)
    (any float dtype: cast to the compute dtype of q); window W in [1, L], default ceil(L / C).
    Returns out (B, H, L, Dv) of q's dtype, differentiable in q, k, v (membership discrete: no
    gradient reaches the centroids). Works under ``torch.compile``.
    """
    r = _check_attention(q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    cd = chk.compute_dtype(r.q.dtype)
    out = _attention(r.q.to(cd), None if r.k is None else r.k.to(cd), r.v.to(cd), r.centroids.to(cd),
                     r.window, r.causal, r.shared_qk, r.profile, r.mask)
    return out.to(r.q.dtype)


def attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    centroids: Any,
    dout: Any,
    *,
    window: int | None = None,
    causal: bool = False,
    shared_qk: bool = False,
    profile: str = "tacl",
    key_padding_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """VJP of :func:`attention` with the membership held fixed: (dq, dk, dv); dk None with shared QK."""
    chk.same_device(q=q, dout=dout)
    r = _check_attention(q, k, v, centroids, window, causal, shared_qk, profile, key_padding_mask)
    dout = chk.float_tensor(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    chk.expect_shape(dout, "dout", tuple(r.v.shape), "(B, H, L, Dv)")
    cd = chk.compute_dtype(r.q.dtype)
    means = r.centroids.to(cd)
    if r.shared_qk:
        dq, dv = _vjp(lambda a, c: _attention(a, None, c, means, r.window, r.causal, True, r.profile, r.mask),
                      [r.q.to(cd), r.v.to(cd)], [dout.to(cd)])
        return dq.to(r.q.dtype), None, dv.to(r.v.dtype)
    dq, dk, dv = _vjp(lambda a, b, c: _attention(a, b, c, means, r.window, r.causal, False, r.profile, r.mask),
                      [r.q.to(cd), r.k.to(cd), r.v.to(cd)], [dout.to(cd)])
    return dq.to(r.q.dtype), dk.to(r.k.dtype), dv.to(r.v.dtype)
