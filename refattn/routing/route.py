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

from refattn._validation import float_array, integer_in_range, padding_mask

__all__ = ["route"]

_CHUNK_ELEMENTS = 1 << 22  # (rows x L) entries per chunk of centroid rows


def _route_rows(scores: np.ndarray, window: int, padded: np.ndarray | None) -> np.ndarray:
    """Members (R, W) of R rows of scores (R, L); ``padded`` (R, L) bool or None. No checks."""
    rows, length = scores.shape
    if padded is not None:
        scores = np.where(padded, -np.inf, scores)
    threshold = np.partition(scores, length - window, axis=-1)[:, length - window, None]
    above = scores > threshold
    tied = scores == threshold
    still_needed = window - above.sum(axis=-1, keepdims=True)
    take = above | (tied & (np.cumsum(tied, axis=-1) <= still_needed))
    if padded is not None:
        take &= ~padded  # rows with fewer than W unpadded tokens: threshold -inf took padding
    row, position = np.nonzero(take)  # row-major: each row's positions ascending
    taken = take.sum(axis=-1)
    first = np.cumsum(taken) - taken
    slot = np.arange(row.size) - first[row]
    members = np.full((rows, window), -1, dtype=np.int64)
    members[row, slot] = position
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
    scores = float_array(similarities, "similarities", rank=4, axes="(B, H, L, C)")
    batch, heads, length, clusters = scores.shape
    if 0 in scores.shape:
        raise ValueError(f"similarities: expected every axis of (B, H, L, C) to be at least 1, got shape {scores.shape}")
    window = integer_in_range(window, "window", low=1, high=length)
    mask = padding_mask(key_padding_mask, batch, length)
    members = np.empty((batch, heads, clusters, window), dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // length)
    for b in range(batch):
        padded_row = None if mask is None or not mask[b].any() else mask[b]
        for h in range(heads):
            for c0 in range(0, clusters, chunk):
                c1 = min(clusters, c0 + chunk)
                rows = np.ascontiguousarray(scores[b, h, :, c0:c1].T)  # (chunk, L)
                padded = None if padded_row is None else np.broadcast_to(padded_row, rows.shape)
                members[b, h, c0:c1] = _route_rows(rows, window, padded)
    return members
