"""Gather and scatter of token rows through (B, H, C, W) member arrays (-1 = an empty slot)."""

from __future__ import annotations

import numpy as np


def flat_rows(members: np.ndarray, length: int) -> np.ndarray:
    """Row numbers into a (B * H * L, F) view for members (B, H, C, W); empty slots point at row 0
    of their (b, h) (callers give them weight 0)."""
    batch, heads = members.shape[:2]
    base = (np.arange(batch * heads, dtype=np.int64) * length).reshape(batch, heads, 1, 1)
    return base + np.maximum(members, 0)


def gather(x: np.ndarray, members: np.ndarray) -> np.ndarray:
    """x (B, H, L, F) -> (B, H, C, W, F): the rows of the members (empty slots: an arbitrary row)."""
    batch, heads, length, features = x.shape
    return x.reshape(batch * heads * length, features)[flat_rows(members, length)]


def scatter_add(values: np.ndarray, members: np.ndarray, length: int) -> np.ndarray:
    """Sum the rows values (B, H, C, W, F) into (B, H, L, F) at the members' positions.

    Empty slots (-1) are dropped. A vectorised segmented sum (``np.add.at``): a position taken by
    several clusters receives the sum of its rows.
    """
    batch, heads = members.shape[:2]
    features = values.shape[-1]
    out = np.zeros((batch * heads * length, features))
    filled = members >= 0
    np.add.at(out, flat_rows(members, length)[filled], values[filled])
    return out.reshape(batch, heads, length, features)


def member_counts(members: np.ndarray, length: int) -> np.ndarray:
    """count[b, h, t] = number of clusters whose member list holds t, (B, H, L) float64."""
    batch, heads = members.shape[:2]
    filled = members >= 0
    counts = np.bincount(flat_rows(members, length)[filled], minlength=batch * heads * length)
    return counts.reshape(batch, heads, length).astype(np.float64)
