"""Routing step 3 on tensors (reference: :mod:`refattn.routing.route`).

Differs from the reference: on a CPU the selection is a C++ kernel (:func:`~..kernels.route_rows`,
``routing_route.cpp``): per row, the maxima of groups of scores bound θ, the W-th largest, from
below; θ is the W-th largest of the few scores above that bound, and the tie rule reads those scores
in position order. Elsewhere (and without g++, or under ``torch.compile``) it is torch's, vectorised
over batch, heads and centroids, in chunks of centroids that bound the (chunk, L) temporaries: per
centroid the top W similarities and θ come from ``torch.topk``, over groups of scores where L allows
(:func:`top_window_by_groups`); when exactly W tokens of every row are >= θ (continuous data), their
positions sorted are the members. Otherwise the exact tie rule decides (:func:`route_rows_with_ties`):
every token above θ and, in position order, as many equal to θ as are still needed, located by one
``searchsorted`` on the running count. Under ``torch.compile`` the tie rule always decides (the test
would read tensor values, a graph break).
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks

from .. import kernels
from ..tensors import checked, compute_dtype, tensors

__all__ = ["route", "check_route", "route_core", "route_by_centroid", "route_rows", "route_rows_with_ties",
           "group_size", "top_window_by_groups"]

CHUNK_ELEMENTS = 1 << 24  # (B * H * clusters * L) entries per chunk of centroids


def group_size(length: int, window: int) -> int:
    """The group size b of :func:`top_window_by_groups`: the largest power of two that divides L with
    b² <= L / W, which balances its two selections (L / b maxima, then (W + 1)·b kept scores); 1: none."""
    size = 1
    while length % (2 * size) == 0 and (2 * size) ** 2 * window <= length:
        size *= 2
    return size


def top_window_by_groups(scores: torch.Tensor, window: int, size: int) -> tuple[torch.Tensor, ...]:
    """(positions (..., W) of a top W, θ (..., 1) the W-th largest score, exactly; whether every row has
    exactly W scores >= θ (0-d bool)) of rows of scores (..., L), from selections over L / b and
    (W + 1)·b scores instead of one over L: on a CPU ``torch.topk`` costs about the same per score
    whatever W.

    Cut a row into L / b groups of b scores (group j: positions j, j + L / b, ...) and keep the W + 1
    groups with the largest maxima. M, the W-th largest maximum, is <= θ (W scores reach it); every
    score above M is kept, and so are W maxima >= M. So if θ > M every score >= θ is kept, and if
    θ = M the kept maxima are W scores >= θ: either way the W-th largest kept score is θ, ties
    included. A row has exactly W scores >= θ when W kept scores are and M', the least kept maximum,
    which bounds every score not kept, is below θ.
    """
    groups = scores.shape[-1] // size
    strided = scores.unflatten(-1, (size, groups))  # [..., k, j]: position k * groups + j
    maxima = torch.topk(strided.amax(dim=-2), window + 1, dim=-1, sorted=False)
    kept = maxima.indices  # W + 1 groups: M', the least of their maxima, bounds every score not kept
    candidates = torch.gather(strided, -1, kept.unsqueeze(-2).expand(kept.shape[:-1] + (size, window + 1)))
    candidates = candidates.flatten(-2)  # [..., k * (W + 1) + slot]
    top = torch.topk(candidates, window, dim=-1, sorted=False)
    threshold = top.values.amin(dim=-1, keepdim=True)
    exactly_window = torch.count_nonzero(candidates >= threshold) == threshold.numel() * window
    unique = exactly_window & (maxima.values.amin(dim=-1, keepdim=True) < threshold).all()
    slot = top.indices % (window + 1)
    return (top.indices // (window + 1)) * groups + torch.gather(kept, -1, slot), threshold, unique


def route_rows(scores: torch.Tensor, window: int, padded: torch.Tensor | None) -> torch.Tensor:
    """Members (..., W) of rows of scores (..., L); ``padded`` broadcastable bool or None."""
    if padded is not None:
        scores = scores.masked_fill(padded, float("-inf"))
    size = group_size(scores.shape[-1], window)
    if size > 1:
        positions, threshold, unique = top_window_by_groups(scores, window, size)
    else:
        top = torch.topk(scores, window, dim=-1, sorted=False)  # unsorted: a third faster on a CPU
        positions, threshold = top.indices, top.values.amin(dim=-1, keepdim=True)
        # Each row has at least W scores >= its threshold: a total of W per row means exactly W in each.
        unique = torch.count_nonzero(scores >= threshold) == threshold.numel() * window
    if not torch.compiler.is_compiling() and bool(unique & torch.isfinite(threshold).all()):
        return torch.sort(positions, dim=-1).values
    return route_rows_with_ties(scores, window, threshold, padded)


def route_rows_with_ties(scores: torch.Tensor, window: int, threshold: torch.Tensor,
                         padded: torch.Tensor | None) -> torch.Tensor:
    """The exact tie rule. ``taken``, the running count of taken tokens along a row, never decreases,
    so the j-th taken token is where it first reaches j + 1: one ``searchsorted``, no scatter."""
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


def route_by_centroid(scores: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """members (B, H, C, W) int64 from the similarities laid out (B, H, C, L) (no checks, no gradient)."""
    batch, heads, clusters, length = scores.shape
    scores = scores.detach().contiguous()
    if kernels.available(scores):
        members = kernels.route_rows(scores, window, mask)
        if members is not None:  # else an unpadded score is NaN or infinite: torch's rule, whatever it makes of it
            return members
    padded = None if mask is None else mask[:, None, None, :]
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * length))
    if chunk >= clusters:
        return route_rows(scores, window, padded)
    parts = [route_rows(scores[:, :, c0 : c0 + chunk], window, padded) for c0 in range(0, clusters, chunk)]
    return torch.cat(parts, dim=2)


def route_core(similarities: torch.Tensor, window: int, mask: torch.Tensor | None) -> torch.Tensor:
    """members (B, H, C, W) int64 from S (B, H, L, C) (no checks, no gradient)."""
    return route_by_centroid(similarities.detach().transpose(-1, -2), window, mask)


@checked
def check_route(similarities: Any, window: Any, key_padding_mask: Any = None) -> tuple[torch.Tensor, int, Any]:
    """Validate the arguments of :func:`route`; returns them in that order."""
    scores, key_padding_mask = tensors(similarities=similarities, key_padding_mask=key_padding_mask)
    checks.float_array(scores, "similarities", rank=4, axes="(B, H, L, C)")
    batch, heads, length, clusters = scores.shape
    if 0 in scores.shape:
        raise ValueError(
            f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {tuple(scores.shape)}")
    window = checks.integer_in_range(window, "window", low=1, high=length)
    return scores, window, checks.padding_mask(key_padding_mask, batch, length)


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> torch.Tensor:
    """members (B, H, C, W) int64 on the similarities' device; no gradient."""
    scores, window, mask = check_route(similarities, window, key_padding_mask)
    return route_core(scores.to(compute_dtype(scores.dtype)), window, mask)
