"""Routing step 3: balanced cluster membership, top-W tokens per centroid (spec/routing.md, step 3).

Every centroid c takes the W tokens with the largest similarity S[:, :, t, c] (ties: the lower
position first), listed in increasing position. A token can be taken by several centroids or by
none. Padded tokens are never taken; when fewer than W tokens are unpadded, the slots left over
hold -1 and come last.

The selection is exact and needs no sort of the whole row: the W-th largest value θ of a row is
found with a partition (O(L)); the row takes every token with S > θ and then, in position order,
as many tokens with S = θ as are still needed. ``np.nonzero`` then lists each row's chosen tokens
in position order. Centroids are processed in chunks so that the temporary (chunk, L) arrays stay
small; nothing of size L x L is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn import checks

__all__ = ["route", "check_route", "route_core"]

_CHUNK_ELEMENTS = 1 << 22  # (rows x L) entries per chunk of centroid rows


def _route_rows(scores: Any, window: int, padded: Any) -> Any:
    """Members (R, W) of R rows of scores (R, L); ``padded`` (R, L) bool or None. No checks."""
    xp = checks.array_namespace(scores)
    rows, length = scores.shape
    if padded is not None:
        scores = xp.where(padded, -np.inf, scores)
    threshold = xp.partition(scores, length - window, axis=-1)[:, length - window, None]
    above = scores > threshold
    tied = scores == threshold
    still_needed = window - above.sum(axis=-1, keepdims=True)
    take = above | (tied & (xp.cumsum(tied, axis=-1) <= still_needed))
    if padded is not None:
        take &= ~padded  # rows with fewer than W unpadded tokens: threshold -inf took padding
    row, position = xp.nonzero(take)  # row-major: each row's positions ascending
    taken = take.sum(axis=-1)
    first = xp.cumsum(taken) - taken
    slot = xp.arange(row.size) - first[row]
    members = xp.full((rows, window), -1, dtype=np.int64)
    members[row, slot] = position
    return members


def check_route(similarities: Any, window: Any, key_padding_mask: Any = None) -> tuple[Any, int, Any]:
    """Validate the arguments of :func:`route`; returns them in that order."""
    scores, key_padding_mask = checks.arrays(similarities=similarities, key_padding_mask=key_padding_mask)
    scores = checks.float_array(scores, "similarities", rank=4, axes="(B, H, L, C)")
    batch, heads, length, clusters = scores.shape
    if 0 in scores.shape:
        raise ValueError(
            f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {scores.shape}")
    window = checks.integer_in_range(window, "window", low=1, high=length)
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return scores, window, mask


def route_core(similarities: Any, window: int, *, key_padding_mask: Any = None) -> Any:
    """:func:`route` of validated arguments; the similarities are compared in their own dtype."""
    xp = checks.array_namespace(similarities)
    batch, heads, length, clusters = similarities.shape
    members = xp.empty((batch, heads, clusters, window), dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // length)
    for b in range(batch):
        mask_row = None if key_padding_mask is None else key_padding_mask[b]
        padded_row = None if mask_row is None or not bool(mask_row.any()) else mask_row
        for h in range(heads):
            for c0 in range(0, clusters, chunk):
                c1 = min(clusters, c0 + chunk)
                rows = xp.ascontiguousarray(similarities[b, h, :, c0:c1].T)  # (chunk, L)
                padded = None if padded_row is None else xp.broadcast_to(padded_row, rows.shape)
                members[b, h, c0:c1] = _route_rows(rows, window, padded)
    return members


def route(similarities: Any, window: int, *, key_padding_mask: Any = None) -> np.ndarray:
    """Balanced membership: each centroid takes the ``window`` most similar tokens.

    For every (b, h, c), members[b, h, c] lists, in increasing position, the W = ``window``
    unpadded positions t with the largest S[b, h, t, c]; among equal similarities the lower
    position is taken first. Position order matters for causal masking and for readability; the
    attention result does not depend on it.

    Edge cases: a token may be a member of several clusters or of none (nothing balances the
    tokens, only the clusters). Padded tokens are never members. If a batch element has fewer than
    W unpadded tokens, each of its rows holds all of them followed by -1 in the remaining slots.

    Args:
        similarities: S (B, H, L, C), finite floats (from :func:`similarity`).
        window: W, an integer in [1, L].
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        members (B, H, C, W) int64, positions in [0, L), -1 for an empty slot. Cost O(B H C L)
        (a partition per centroid), memory O(B H C W) plus a bounded chunk.
    """
    similarities, window, key_padding_mask = check_route(similarities, window, key_padding_mask)
    return route_core(checks.as_float64(similarities), window, key_padding_mask=key_padding_mask)
