"""Routing steps 1-3, 7 and 8 (spec/routing.md) on Numba-CUDA kernels: what decides and maintains the clusters.

``normalize``, ``similarity``, ``route``, ``assign``, ``update_centroids``, ``commitment_loss`` and
the VJPs of the differentiable ones, with the signatures of the reference :mod:`refattn.routing`.

Every function first validates its arguments as the reference does (same exception types and
messages), on metadata only: device arrays are not copied to the host, their NaN/Inf are counted by
a device kernel, and only the (B, L) padding mask is brought to the host. Then everything runs on the
device (kernels in :mod:`._clustering_kernels`): NumPy inputs are copied there and the results back;
device inputs (Numba device arrays, anything with ``__cuda_array_interface__``) are used in place
and the results are Numba device arrays. Floats are computed in float64 if any floating input is
float64, otherwise in float32; indices are int64. ``commitment_loss`` returns a Python float, as the
reference does (reading it synchronises with the device).

The underscored ``_normalize``, ``_normalize_vjp``, ``_similarity``, ``_route`` and ``_padded`` take
a :class:`Call` and device arrays and return device arrays, so that the routing pipeline and the
cluster attention (whose logit features are made of this normalization) compose them without host
round trips.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from refattn.checks import expect_shape, integer_in_range, padding_mask, real_number
from refattn.routing.centroids import CentroidState
from refattn.routing.profiles import Profile, get_profile

from ._clustering_kernels import GEMM, PARTIALS, RADIX, RANK_THREADS, TRANSPOSE
from ._kernels import REDUCE
from ._runtime import Call, Meta, float_array, host_small, launch, pow2_at_least, sequence

__all__ = ["normalize", "normalize_vjp", "similarity", "similarity_vjp", "route", "assign", "update_centroids",
           "commitment_loss", "commitment_loss_vjp"]

_SEQUENCE = "(B, H, L, D)"
_ROW_LANES = 32  # the most lanes (threads) per row in the row-reduction kernels
_LANE_FEATURES = 8  # features a lane of a row kernel sums on its own (fewer lanes: a shorter tree, fewer barriers)
_THREAD_ITEMS = 16  # tokens (centroid statistics) or elements (commitment loss) a reduction thread adds on its own


# ---------------------------------------------------------------- helpers


def _grid(kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], *args: Any) -> None:
    """A multi-dimensional launch; nothing when the grid is empty."""
    if all(grid):
        kernel[grid, block](*args)


def _centroids(centroids: Any, heads: int | None, dim: int | None, name: str = "centroids") -> Meta:
    """:func:`refattn.checks.centroid_array` (same messages) on a host or device array."""
    meta = float_array(centroids, name, rank=3, axes="(H, C, D)")
    expect_shape(meta, name, (heads, None, dim), "(H, C, D)")
    if 0 in meta.shape:
        raise ValueError(f"{name}: expected every axis of (H, C, D) to be at least 1, got shape {meta.shape}")
    return meta


def _padded(call: Call, mask: np.ndarray | None, batch: int, length: int) -> Any:
    """The padding flags (B, L) int64 on the device: 1 = padding, all 0 without a mask."""
    if mask is None:
        return call.zeros((batch, length), np.int64)
    return cuda.to_device(np.ascontiguousarray(mask, dtype=np.int64))


def _row_block(dim: int, rows: int) -> tuple[int, int]:
    """(lanes per row, rows per block) of the row kernels: lanes a power of two <= 32 with about
    _LANE_FEATURES features each (one lane, hence no tree and no barrier, up to D = 8), as many rows as
    fit in REDUCE threads (no more than there are, at least one: no rows make an empty grid)."""
    lanes = min(_ROW_LANES, pow2_at_least(-(-dim // _LANE_FEATURES)))
    return lanes, min(REDUCE // lanes, max(rows, 1))


def _as_rows(x: Any) -> Any:
    """``x`` as a 4-D (B, H, L, D) device array whose (b, h, t) are the rows over the last axis.

    A 4-D array is used as it is, with any strides. Other ranks are reshaped to (1, 1, rows, D), which
    needs a C-contiguous array: a strided one is first copied into one on the device.
    """
    shape = tuple(x.shape)
    if len(shape) == 4:
        return x
    if not x.is_c_contiguous():
        dense = cuda.device_array(shape, dtype=x.dtype)
        dense[:] = x
        x = dense
    return x.reshape(1, 1, math.prod(shape[:-1]), shape[-1])


def _rows_launch(call: Call, name: str, x: Any, *args: Any) -> None:
    """Launch a row kernel over the rows of the 4-D ``x`` (its first argument)."""
    batch, heads, length, dim = x.shape
    rows = batch * heads * length
    lanes, per_block = _row_block(dim, rows)
    _grid(call.kernels[name], ((rows + per_block - 1) // per_block,), (lanes, per_block), x, *args)


def _features(x: Any) -> Meta:
    """The normalize input: a finite float array of any rank >= 1 whose last axis is not empty."""
    meta = float_array(x, "x")
    if meta.ndim < 1 or meta.shape[-1] < 1:
        raise ValueError(f"x: expected an array whose last axis (D) has at least 1 entry, got shape {meta.shape}")
    return meta


# ---------------------------------------------------------------- step 1: normalize


def _normalize(call: Call, x: Any, profile: Profile) -> Any:
    """N(x), the profile's normalization of the device array ``x`` (any rank) over its last axis."""
    out = call.empty(x.shape)
    _rows_launch(call, "normalize_k", _as_rows(x), int(profile.norm == "layernorm"), call.scalar(profile.norm_eps),
                 _as_rows(out))
    return out


def _normalize_vjp(call: Call, x: Any, dy: Any, profile: Profile, base: Any = None) -> Any:
    """dx = [base +] N'(x)ᵀ dy of device arrays of one shape, N as in :func:`_normalize`.

    ``base`` is added in the same kernel: the cluster-attention backward sums two gradients of q so.
    """
    dx = call.empty(x.shape)
    rows = _as_rows(dy)
    _rows_launch(call, "normalize_vjp_k", _as_rows(x), rows, int(profile.norm == "layernorm"),
                 call.scalar(profile.norm_eps), int(base is not None), rows if base is None else _as_rows(base),
                 _as_rows(dx))
    return dx


def normalize(x: Any, *, profile: str = "tacl") -> Any:
    """Normalize every row of ``x`` over its last axis, as the profile's routing does.

    ``tacl``::

        x̂ = (x - m) / sqrt(v + 1e-6),   m = mean_d x_d,   v = mean_d (x_d - m)^2

    (LayerNorm with no scale and no bias: mean 0, ||x̂|| ~ sqrt(D). With D = 1, x̂ = 0.)

    ``lucidrains``::

        x̂ = x / max(||x||_2, 1e-12)

    (unit norm; a zero row stays zero).

    One device row per (b, h, t): up to 32 lanes on consecutive features, about 8 features each,
    their sums tree-reduced (a row of D <= 8 is one thread).

    Args:
        x: float array (B, H, L, D) (any rank >= 1 is accepted: the centroids are normalized the
            same way).
        profile: ``"tacl"`` or ``"lucidrains"``.

    Returns:
        x̂, same shape as x, in the compute dtype.
    """
    profile = get_profile(profile)
    _features(x)
    call = Call(x)
    return call.out(_normalize(call, call.put(x), profile))


def normalize_vjp(x: Any, dx_hat: Any, *, profile: str = "tacl") -> Any:
    """Vector-Jacobian product of :func:`normalize`.

    ``tacl``, with y = x̂ and σ = sqrt(v + 1e-6)::

        dx = (dy - mean_d(dy) - y * mean_d(dy * y)) / σ

    ``lucidrains``, with n = ||x||::

        dx = (dy - y (y · dy)) / n     if n > 1e-12,    dx = dy / 1e-12 otherwise (the clamp is active)

    Args:
        x: the forward input; dx_hat: cotangent of x̂, same shape.

    Returns:
        dx, same shape as x, in the compute dtype.
    """
    profile = get_profile(profile)
    meta = _features(x)
    dy = float_array(dx_hat, "dx_hat")
    expect_shape(dy, "dx_hat", meta.shape, "like x")
    call = Call(x, dx_hat)
    return call.out(_normalize_vjp(call, call.put(x), call.put(dx_hat), profile))


# ---------------------------------------------------------------- step 2: similarity


def _tile(size: int) -> int:
    """Threads along one side of a similarity tile: GEMM, or fewer for a smaller axis."""
    return min(GEMM, size)


def _similarity(call: Call, x_hat: Any, centroids: Any) -> Any:
    """S (B, H, L, C) of device arrays: one GEMM x GEMM (token, centroid) tile per block."""
    batch, heads, length, _ = x_hat.shape
    clusters = centroids.shape[1]
    s = call.empty((batch, heads, length, clusters))
    cols, rows = _tile(clusters), _tile(length)
    _grid(call.kernels["similarity_k"], (-(-clusters // cols), -(-length // rows), batch * heads), (cols, rows),
          x_hat, centroids, s)
    return s


def similarity(x_hat: Any, centroids: Any) -> Any:
    """Dot products of the normalized tokens with the centroids of their head.

        S[b, h, t, c] = sum_d x_hat[b, h, t, d] * centroids[h, c, d]

    A batched GEMM on the device: 16 x 16 output tiles, both operands staged in shared memory.

    Args:
        x_hat: (B, H, L, D) normalized queries or keys.
        centroids: (H, C, D) centroid means.

    Returns:
        S, (B, H, L, C) in the compute dtype. Cost O(B H L C D).
    """
    meta = sequence(x_hat, "x_hat", _SEQUENCE)
    _centroids(centroids, meta.shape[1], meta.shape[3])
    call = Call(x_hat, centroids)
    return call.out(_similarity(call, call.put(x_hat), call.put(centroids)))


def similarity_vjp(x_hat: Any, centroids: Any, ds: Any) -> tuple[Any, Any]:
    """Vector-Jacobian product of :func:`similarity`.

        dx_hat[b, h, t] = sum_c ds[b, h, t, c] μ[h, c],     dμ[h, c] = sum_{b, t} ds[b, h, t, c] x_hat[b, h, t]

    Two tiled GEMMs; dμ is summed over t per (b, h) and then over b (no atomics: deterministic).

    Args:
        x_hat, centroids: the forward inputs; ds: cotangent of S, (B, H, L, C).

    Returns:
        (dx_hat (B, H, L, D), dcentroids (H, C, D)), in the compute dtype.
    """
    meta = sequence(x_hat, "x_hat", _SEQUENCE)
    batch, heads, length, dim = meta.shape
    clusters = _centroids(centroids, heads, dim).shape[1]
    dsm = float_array(ds, "ds", rank=4, axes="(B, H, L, C)")
    expect_shape(dsm, "ds", (batch, heads, length, clusters), "(B, H, L, C)")
    call = Call(x_hat, centroids, ds)
    x_dev, mu, g = call.put(x_hat), call.put(centroids), call.put(ds)
    dx = call.empty(meta.shape)
    cols, rows = _tile(dim), _tile(length)
    _grid(call.kernels["similarity_dx_k"], (-(-dim // cols), -(-length // rows), batch * heads), (cols, rows),
          g, mu, dx)
    partial = call.empty((batch, heads, clusters, dim))
    rows = _tile(clusters)
    _grid(call.kernels["similarity_dmu_k"], (-(-dim // cols), -(-clusters // rows), batch * heads), (cols, rows),
          g, x_dev, partial)
    dmu = call.empty((heads, clusters, dim))
    launch(call.kernels["sum_over_batch_k"], dmu.size, partial, dmu)
    return call.out(dx), call.out(dmu)


# ---------------------------------------------------------------- step 3: route


def _route(call: Call, scores: Any, window: int, padded: Any) -> Any:
    """members (B, H, C, W) int64 of the device similarities (B, H, L, C) and padding flags (B, L):
    rows of up to RANK_THREADS tokens ranked by counting (one thread per token, as many rows per
    block as fit in RANK_THREADS threads), longer ones by a radix select over their transposed keys."""
    batch, heads, length, clusters = scores.shape
    members = call.empty((batch, heads, clusters, window), np.int64)
    rows = batch * heads * clusters
    if length <= RANK_THREADS:
        per_block = min(RANK_THREADS // length, rows)
        _grid(call.kernels["route_rank_k"], (-(-rows // per_block),), (length, per_block), scores, padded, window,
              members)
        return members
    keys = call.empty((batch, heads, clusters, length), np.int64)
    side = TRANSPOSE
    _grid(call.kernels["route_keys_k"], (-(-clusters // side), -(-length // side), batch * heads),
          (min(side, max(clusters, length)), min(8, max(clusters, length))), scores, padded, keys)
    _grid(call.kernels["route_radix_k"], (rows,), (RADIX,), keys, window, members)
    return members


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> Any:
    """Balanced membership: each centroid takes the ``window`` most similar tokens.

    For every (b, h, c), members[b, h, c] lists, in increasing position, the W = ``window``
    unpadded positions t with the largest S[b, h, t, c]; among equal similarities the lower
    position is taken first. Padded tokens are never members; if a batch element has fewer than W
    unpadded tokens, each of its rows holds all of them followed by -1 in the remaining slots.

    On the device, on int64 keys of the same order as the similarities: a row of up to 256 tokens is
    ranked by counting (a thread per token: the number of keys before it, larger or equal at a lower
    position; the members are the ranks below W; short rows share a block); a longer row is
    transposed to (B, H, C, L) keys in which an exact radix select (one block per row, 8 bits per
    pass, shared-memory histograms) finds the W-th largest key, and block scans write the members.

    Args:
        similarities: S (B, H, L, C), finite floats (from :func:`similarity`).
        window: W, an integer in [1, L].
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        members (B, H, C, W) int64, positions in [0, L), -1 for an empty slot. Cost O(B H C L²) for
        rows of up to 256 tokens (O(L) per thread), O(B H C L) beyond, with O(B H C L) memory for the
        keys.
    """
    meta = float_array(similarities, "similarities", rank=4, axes="(B, H, L, C)")
    batch, heads, length, clusters = meta.shape
    if 0 in meta.shape:
        raise ValueError(f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {meta.shape}")
    window = integer_in_range(window, "window", low=1, high=length)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    call = Call(similarities)
    return call.out(_route(call, call.put(similarities), window, _padded(call, mask, batch, length)))


# ---------------------------------------------------------------- step 7: assign, update_centroids


def _assign(call: Call, x_hat: Any, centroids: Any, padded: Any) -> Any:
    """labels (B, H, L) int64 on the device: blockDim.y tokens per block sweep the centroid tiles."""
    batch, heads, length, _ = x_hat.shape
    cols, rows = _tile(centroids.shape[1]), _tile(length)
    labels = call.empty((batch, heads, length), np.int64)
    _grid(call.kernels["assign_k"], (-(-length // rows), batch * heads), (cols, rows), x_hat, centroids, padded,
          labels)
    return labels


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> Any:
    """Nearest centroid of every token, by the largest similarity x̂_t · μ_c.

        a[b, h, t] = argmax_c x_hat[b, h, t] · centroids[h, c]      (ties: the lower c)

    This argmax is used only by the k-means update and the commitment loss; attention membership
    is the balanced top-W of :func:`route`.

    Args:
        x_hat: (B, H, L, D) normalized tokens; centroids: (H, C, D).
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        (B, H, L) int64 in [0, C), -1 at padded positions.
    """
    meta = sequence(x_hat, "x_hat", _SEQUENCE)
    _centroids(centroids, meta.shape[1], meta.shape[3])
    mask = padding_mask(host_small(key_padding_mask), meta.shape[0], meta.shape[2])
    call = Call(x_hat, centroids)
    padded = _padded(call, mask, meta.shape[0], meta.shape[2])
    return call.out(_assign(call, call.put(x_hat), call.put(centroids), padded))


def _state(state: Any) -> tuple[int, int, int]:
    """The reference's CentroidState checks (same messages) on host or device arrays; (H, C, D)."""
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    heads, clusters, dim = _centroids(state[0], None, None, "state.means").shape
    counts = float_array(state[1], "state.counts", rank=2, axes="(H, C)")
    expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
    sums = float_array(state[2], "state.sums", rank=3, axes="(H, C, D)")
    expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
    return heads, clusters, dim


def _statistics(call: Call, x_hat: Any, means: Any, padded: Any, counts: Any, sums: Any, accumulate: bool) -> None:
    """N (H, C) and S (H, C, D) of the tokens nearest each centroid, written to (or added to) counts, sums."""
    batch, heads, length, dim = x_hat.shape
    labels = _assign(call, x_hat, means, padded)
    lanes = min(_ROW_LANES, pow2_at_least(dim))
    # token rows: a power of two, each summing about _THREAD_ITEMS tokens before their tree (one row,
    # so no tree and no barrier, for a few tokens)
    rows = min(REDUCE // lanes, pow2_at_least(-(-batch * length // _THREAD_ITEMS)))
    _grid(call.kernels["centroid_stats_k"], (means.shape[1], heads), (lanes, rows), x_hat, labels, int(accumulate),
          counts, sums)


def update_centroids(
    state: CentroidState,
    q_hat: Any,
    k_hat: Any = None,
    *,
    profile: str = "tacl",
    key_padding_mask: Any = None,
    decay: float = 0.999,
) -> CentroidState:
    """One k-means step from a batch of normalized queries (and keys); returns a new state.

    Both profiles first assign every unpadded token to its nearest centroid under the *incoming*
    means (:func:`assign`; queries and keys alike). Padded tokens are excluded from the statistics.

    ``tacl`` (VQ-VAE EMA, U:2959-3058), for x in (q̂, then k̂ when given), per head, with λ = decay:

        N_c = #{(b, t): a(x_bt) = c},  S_c = Σ_{a(x_bt) = c} x_bt
        counts ← λ counts + (1 - λ) N,   sums ← λ sums + (1 - λ) S

    and then, with n = Σ_c counts_c and the Laplace-smoothed counts Ñ_c = (counts_c + ε) n / (n + Cε),
    ε = 1e-5: means_c = sums_c / Ñ_c (the means are kept if n <= 0).

    ``lucidrains`` (R:271-286, R:329-337): x = q̂ (and k̂ concatenated along the sequence when
    given), per head

        m_c = Σ_{b, t: a = c} x_bt / max(||Σ ...||, 1e-12),   m_c = means_c if no token chose c
        means ← λ means + (1 - λ) m

    counts and sums are returned unchanged (copies).

    On the device: N and S by a segmented reduction per (c, h) (no atomics), then elementwise EMA
    kernels; the tacl means with one block per head (n by a tree reduction).

    Args:
        state: the current :class:`CentroidState` (means (H, C, D), counts (H, C), sums (H, C, D)).
        q_hat: (B, H, L, D) normalized queries; k_hat: optional (B, H, L, D) normalized keys
            (None with shared QK).
        profile: ``"tacl"`` or ``"lucidrains"``.
        key_padding_mask: optional bool (B, L), True = padding.
        decay: λ in [0, 1].

    Returns:
        A new CentroidState, in the compute dtype.
    """
    profile = get_profile(profile)
    heads, clusters, dim = _state(state)
    meta = sequence(q_hat, "q_hat", _SEQUENCE)
    expect_shape(meta, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
    batch, _, length, _ = meta.shape
    if k_hat is not None:
        sequence(k_hat, "k_hat", _SEQUENCE, (batch, heads, length), feature=dim)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    decay = real_number(decay, "decay", low=0.0, high=1.0)
    call = Call(state[0], state[1], state[2], q_hat, k_hat)
    means, counts, sums = (call.put(part) for part in state)
    inputs = [call.put(x) for x in (q_hat, k_hat) if x is not None]
    padded = _padded(call, mask, batch, length)
    keep, rate = call.scalar(decay), call.scalar(1.0 - decay)
    batch_counts = call.empty((heads, clusters))
    batch_sums = call.empty((heads, clusters, dim))
    new_means = call.empty((heads, clusters, dim))
    new_counts = call.empty((heads, clusters))
    new_sums = call.empty((heads, clusters, dim))
    if profile.update == "vqvae_ema":
        for x in inputs:  # the queries' EMA step, then the keys' (both assigned under the incoming means)
            _statistics(call, x, means, padded, batch_counts, batch_sums, accumulate=False)
            launch(call.kernels["centroid_ema_k"], new_sums.size, counts, sums, batch_counts, batch_sums, keep, rate,
                   new_counts, new_sums)
            counts, sums = new_counts, new_sums
        _grid(call.kernels["vqvae_means_k"], (heads,), (min(REDUCE, pow2_at_least(clusters * dim)),), new_counts,
              new_sums, means, call.scalar(profile.laplace_eps), new_means)
    else:
        for position, x in enumerate(inputs):  # lucidrains pools the queries and keys
            _statistics(call, x, means, padded, batch_counts, batch_sums, accumulate=position > 0)
        unit = call.empty((heads, clusters, dim))
        _rows_launch(call, "normalize_k", _as_rows(batch_sums), 0, call.scalar(profile.norm_eps), _as_rows(unit))
        launch(call.kernels["spherical_update_k"], new_means.size, means, counts, sums, batch_counts, unit, keep, rate,
               new_means, new_counts, new_sums)
    return CentroidState(call.out(new_means), call.out(new_counts), call.out(new_sums))


# ---------------------------------------------------------------- step 8: commitment loss


def _residual_inputs(x_hat: Any, centroids: Any, key_padding_mask: Any) -> tuple[Meta, np.ndarray | None, int]:
    """The reference's checks; (x_hat metadata, mask, N D) with N the number of unpadded (b, h, t)."""
    meta = sequence(x_hat, "x_hat", _SEQUENCE)
    batch, heads, length, dim = meta.shape
    _centroids(centroids, heads, dim)
    mask = padding_mask(host_small(key_padding_mask), batch, length)
    tokens = batch * length - (0 if mask is None else int(mask.sum()))
    return meta, mask, heads * tokens * dim


def _labels(call: Call, x_hat: Any, centroids: Any, mask: np.ndarray | None) -> Any:
    """The assignment (B, H, L) of the device x_hat, -1 where the host ``mask`` pads."""
    batch, _, length, _ = x_hat.shape
    return _assign(call, x_hat, centroids, _padded(call, mask, batch, length))


def commitment_loss(x_hat: Any, centroids: Any, *, beta: float = 1e-4, key_padding_mask: Any = None) -> float:
    """β times the mean squared distance of each unpadded token to its nearest centroid.

        loss = β / (N D) · Σ_{unpadded (b, h, t)} ||x̂_bht - μ_{h, a(x̂_bht)}||²

    N being the number of unpadded (b, h, t) triples. With no unpadded token the loss is 0.

    On the device: :func:`assign`, then the squared residuals summed by a grid-stride tree
    reduction per block and one more block over the partial sums; only the total comes back.

    Args:
        x_hat: (B, H, L, D) normalized tokens; centroids: (H, C, D).
        beta: the weight β (default 1e-4).
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        The loss, a Python float.
    """
    beta = real_number(beta, "beta", low=0.0)
    meta, mask, count = _residual_inputs(x_hat, centroids, key_padding_mask)
    if count == 0:
        return 0.0
    call = Call(x_hat, centroids)
    x_dev, mu = call.put(x_hat), call.put(centroids)
    labels = _labels(call, x_dev, mu, mask)
    size = math.prod(meta.shape)
    blocks = min(PARTIALS, -(-size // REDUCE))
    threads = min(REDUCE, pow2_at_least(-(-size // (blocks * _THREAD_ITEMS))))  # a shape-only grid: deterministic
    partial = call.empty((blocks,))
    _grid(call.kernels["commitment_partial_k"], (blocks,), (threads,), x_dev, mu, labels, partial)
    total = call.empty((1,))
    _grid(call.kernels["sum_all_k"], (1,), (min(REDUCE, pow2_at_least(blocks)),), partial, total)
    return beta * float(total.copy_to_host()[0]) / count


def commitment_loss_vjp(
    x_hat: Any, centroids: Any, dloss: float = 1.0, *, beta: float = 1e-4, key_padding_mask: Any = None
) -> Any:
    """Gradient of :func:`commitment_loss` with respect to x̂ (the centroids get none):

        dx̂_bht = dloss · 2β (x̂_bht - μ_{a(x̂_bht)}) / (N D),   0 at padded tokens.

    The assignment is piecewise constant, so it contributes nothing (away from ties).

    Returns:
        dx_hat (B, H, L, D) in the compute dtype.
    """
    beta = real_number(beta, "beta", low=0.0)
    dloss = real_number(dloss, "dloss")
    meta, mask, count = _residual_inputs(x_hat, centroids, key_padding_mask)
    call = Call(x_hat, centroids)
    x_dev, mu = call.put(x_hat), call.put(centroids)
    labels = _labels(call, x_dev, mu, mask)
    factor = 0.0 if count == 0 else 2.0 * beta * dloss / count
    dx = call.empty(meta.shape)
    launch(call.kernels["commitment_vjp_k"], dx.size, x_dev, mu, labels, call.scalar(factor), dx)
    return call.out(dx)
