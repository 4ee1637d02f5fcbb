"""Routing step 7 on tensors (reference: :mod:`refattn.routing.centroids`).

Differs from the reference:

- ``init_centroids`` takes a ``torch.Generator`` (one ``torch.randn`` draw in float64) or, for the
  reference's numbers exactly, a ``numpy.random.Generator``; ``dtype`` and ``device`` choose where
  the state lives.
- ``update_centroids`` is split in two so that data-parallel ranks can share one update:
  ``centroid_statistics`` (the batch's counts and sums, which ranks all-reduce) and
  ``apply_centroid_statistics`` (the update); ``update_centroids`` is the two in a row. The state
  may be kept in a wider dtype than the tokens (a layer's float32 state under bfloat16 autocast).
- A cluster's sum S_c adds its tokens in token order on every device (:func:`.indexing.add_rows`), so
  the update is the same from run to run on a GPU too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refattn import checks
from refattn.routing import CentroidState
from refattn.routing.centroids import OVERFLOWS
from refattn.routing.profiles import Profile, get_profile

from ..tensors import check_overflow, check_overflows, checked, compute_dtype, tensors
from .indexing import add_rows
from .normalize import normalize_core
from .similarity import check_similarity, similarity_core

__all__ = [
    "CentroidState",
    "assign",
    "init_centroids",
    "update_centroids",
    "centroid_statistics",
    "apply_centroid_statistics",
    "check_assign",
    "check_state",
    "check_centroid_statistics",
    "check_apply_centroid_statistics",
    "assign_core",
    "statistics_core",
    "apply_core",
]

Statistics = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def assign_core(x_hat: torch.Tensor, centroids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L) int64, the first maximum of x̂ · μ (the lower index), -1 at padding (no checks)."""
    labels = torch.argmax(similarity_core(x_hat.detach(), centroids.detach()), dim=-1)
    if mask is not None:
        labels = labels.masked_fill(mask.unsqueeze(1), -1)
    return labels


@checked
def check_assign(x_hat: Any, centroids: Any, key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`assign` (and of the commitment loss); returns them in that order."""
    x_hat, centroids, key_padding_mask = tensors(x_hat=x_hat, centroids=centroids, key_padding_mask=key_padding_mask)
    check_similarity(x_hat, centroids)
    return x_hat, centroids, checks.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """(B, H, L) int64 on x_hat's device, -1 at padding."""
    x_hat, centroids, mask = check_assign(x_hat, centroids, key_padding_mask)
    cd = compute_dtype(x_hat.dtype, centroids.dtype)
    return assign_core(x_hat.to(cd), centroids.to(cd), mask)


def init_centroids(num_heads: int, num_clusters: int, dim: int, *, rng: torch.Generator | np.random.Generator,
                   profile: str = "tacl", dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> CentroidState:
    """A ``CentroidState`` of ``dtype`` (default ``torch.get_default_dtype()``) on ``device`` (default the
    generator's, the CPU for NumPy's); one draw of (H, C, D) normals, nothing else."""
    profile = get_profile(profile)
    heads = checks.integer_in_range(num_heads, "num_heads", low=1)
    clusters = checks.integer_in_range(num_clusters, "num_clusters", low=1)
    dim = checks.integer_in_range(dim, "dim", low=1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if isinstance(rng, torch.Generator):
        draw = torch.randn((heads, clusters, dim), generator=rng, dtype=torch.float64, device=rng.device)
    elif isinstance(rng, np.random.Generator):
        draw = torch.from_numpy(rng.standard_normal((heads, clusters, dim)))
    else:
        raise TypeError(f"rng: expected a torch.Generator or a numpy.random.Generator, got {type(rng).__name__}")
    means = normalize_core(draw, profile).to(device=device if device is not None else draw.device, dtype=dtype)
    counts = torch.zeros((heads, clusters), dtype=dtype, device=means.device)
    return CentroidState(means, counts, means.clone())


@checked
def check_state(state: Any) -> CentroidState:
    """Validate a ``CentroidState`` (any 3-tuple of means, counts, sums) of tensors on one device."""
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    means, counts, sums = tensors(**{"state.means": state[0], "state.counts": state[1], "state.sums": state[2]})
    checks.centroid_array(means, None, None, "state.means")
    heads, clusters, dim = means.shape
    checks.float_array(counts, "state.counts", rank=2, axes="(H, C)")
    checks.expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
    checks.float_array(sums, "state.sums", rank=3, axes="(H, C, D)")
    checks.expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
    return CentroidState(means, counts, sums)


def statistics_core(x_hat: torch.Tensor, means: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: N_c (H, C) tokens whose nearest centroid is c, S_c (H, C, D) their sum (padding excluded)."""
    heads, clusters, dim = means.shape
    labels = assign_core(x_hat, means, mask)  # (B, H, L)
    keep = labels >= 0
    head = torch.arange(heads, device=labels.device).reshape(1, heads, 1)
    flat = (head * clusters + labels.clamp(min=0)).reshape(-1)
    weight = keep.reshape(-1).to(means.dtype)
    counts = torch.zeros(heads * clusters, dtype=means.dtype, device=means.device).scatter_add(0, flat, weight)
    rows = x_hat.detach().to(means.dtype).reshape(-1, dim) * weight.unsqueeze(-1)
    sums = add_rows(heads * clusters, flat, rows)  # in token order on every device (CUDA's index_add is atomic)
    return counts.reshape(heads, clusters), sums.reshape(heads, clusters, dim)


@checked
def check_centroid_statistics(state: Any, q_hat: Any, k_hat: Any = None, key_padding_mask: Any = None) -> tuple:
    """Validate the arguments of :func:`centroid_statistics`; returns them in that order."""
    state = check_state(state)
    tensors(**{"q_hat": q_hat, "k_hat": k_hat, "key_padding_mask": key_padding_mask, "state.means": state.means})
    heads, clusters, dim = state.means.shape
    checks.sequence(q_hat, "q_hat", "(B, H, L, D)")
    checks.expect_shape(q_hat, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
    batch, _, length, _ = q_hat.shape
    if k_hat is not None:
        checks.sequence(k_hat, "k_hat", "(B, H, L, D)", (batch, heads, length), feature=dim)
    return state, q_hat, k_hat, checks.padding_mask(key_padding_mask, batch, length)


def centroid_statistics(state: CentroidState, q_hat: Any, k_hat: Any = None, *,
                        key_padding_mask: Any = None) -> Statistics:
    """((N (H, C), S (H, C, D)) of q̂, then of k̂ when given): the unpadded tokens nearest to each
    centroid under the incoming means, counted and summed over the batch (so that ranks can sum them),
    in the compute dtype of the state and the tokens."""
    state, q_hat, k_hat, mask = check_centroid_statistics(state, q_hat, k_hat, key_padding_mask)
    cd = compute_dtype(state.means.dtype, q_hat.dtype)
    means = state.means.to(cd)
    return tuple(statistics_core(x.to(cd), means, mask) for x in (q_hat, k_hat) if x is not None)


def apply_core(state: CentroidState, statistics: Statistics, profile: Profile, decay: float) -> CentroidState:
    """The profile's update of ``state`` from (N, S) pairs (no checks); a state of the incoming dtypes."""
    cd = statistics[0][0].dtype if statistics else compute_dtype(state.means.dtype)
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


@checked
def check_apply_centroid_statistics(state: Any, statistics: Any, profile: Any = "tacl",
                                    decay: Any = 0.999) -> tuple[CentroidState, Statistics, Profile, float]:
    """Validate the arguments of :func:`apply_centroid_statistics`; returns them in that order."""
    profile = get_profile(profile)
    state = check_state(state)
    decay = checks.real_number(decay, "decay", low=0.0, high=1.0)
    heads, clusters, dim = state.means.shape
    if not isinstance(statistics, (tuple, list)):
        raise TypeError(f"statistics: expected a sequence of (counts, sums) pairs, got {type(statistics).__name__}")
    pairs = []
    for i, pair in enumerate(statistics):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"statistics[{i}]: expected a (counts, sums) pair, got {type(pair).__name__}")
        counts, sums = tensors(**{f"statistics[{i}].counts": pair[0], f"statistics[{i}].sums": pair[1],
                                  "state.means": state.means})[:2]
        checks.float_array(counts, f"statistics[{i}].counts", rank=2, axes="(H, C)")
        checks.expect_shape(counts, f"statistics[{i}].counts", (heads, clusters), "(H, C)")
        checks.float_array(sums, f"statistics[{i}].sums", rank=3, axes="(H, C, D)")
        checks.expect_shape(sums, f"statistics[{i}].sums", (heads, clusters, dim), "(H, C, D)")
        pairs.append((counts, sums))
    if not pairs:
        raise ValueError("statistics: expected at least one (counts, sums) pair, got none")
    return state, tuple(pairs), profile, decay


def apply_centroid_statistics(state: CentroidState, statistics: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                              profile: str = "tacl", decay: float = 0.999) -> CentroidState:
    """The update of :func:`update_centroids` from (possibly all-reduced) statistics, queries' first:
    a new state of the incoming state's dtypes."""
    state, pairs, profile, decay = check_apply_centroid_statistics(state, statistics, profile, decay)
    cd = compute_dtype(state.means.dtype, pairs[0][1].dtype)
    pairs = tuple((c.to(cd), s.to(cd)) for c, s in pairs)
    new = apply_core(state, pairs, profile, decay)
    (update,) = OVERFLOWS["update_centroids"]  # update_centroids' rule, its statistics given here instead of q̂, k̂
    check_overflow(new, update.where, statistics=torch.stack([s for _, s in pairs]))
    return new


def update_centroids(state: CentroidState, q_hat: Any, k_hat: Any = None, *, profile: str = "tacl",
                     key_padding_mask: Any = None, decay: float = 0.999) -> CentroidState:
    """A new state (the incoming tensors are not modified): ``apply_centroid_statistics`` of
    ``centroid_statistics``. No gradient."""
    profile = get_profile(profile)
    decay = checks.real_number(decay, "decay", low=0.0, high=1.0)
    statistics = centroid_statistics(state, q_hat, k_hat, key_padding_mask=key_padding_mask)
    new = apply_core(check_state(state), statistics, profile, decay)
    check_overflows(new, OVERFLOWS["update_centroids"], q_hat=q_hat, k_hat=k_hat)
    return new
