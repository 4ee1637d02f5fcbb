"""Gather and scatter of token rows through (B, H, C, W) member arrays (-1 = an empty slot).

NumPy and CuPy arrays (the namespace is the arrays'); results in the dtype of the rows.
"""

from __future__ import annotations

from typing import Any

from refattn import checks

__all__ = ["flat_rows", "gather", "scatter_add", "member_counts"]


def flat_rows(members: Any, length: int) -> Any:
    """Row numbers into a (B * H * L, F) view for members (B, H, C, W); empty slots point at row 0
    of their (b, h) (callers give them weight 0)."""
    xp = checks.array_namespace(members)
    batch, heads = members.shape[:2]
    base = (xp.arange(batch * heads, dtype=members.dtype) * length).reshape(batch, heads, 1, 1)
    return base + xp.maximum(members, 0)


def gather(x: Any, members: Any) -> Any:
    """x (B, H, L, F) -> (B, H, C, W, F): the rows of the members (empty slots: an arbitrary row)."""
    batch, heads, length, features = x.shape
    return x.reshape(batch * heads * length, features)[flat_rows(members, length)]


def scatter_add(values: Any, members: Any, length: int) -> Any:
    """Sum the rows values (B, H, C, W, F) into (B, H, L, F) at the members' positions.

    Empty slots (-1) are dropped. A vectorised segmented sum (``add.at``): a position taken by
    several clusters receives the sum of its rows.
    """
    xp = checks.array_namespace(values, members)
    batch, heads = members.shape[:2]
    features = values.shape[-1]
    out = xp.zeros((batch * heads * length, features), dtype=values.dtype)
    filled = members >= 0
    xp.add.at(out, flat_rows(members, length)[filled], values[filled])
    return out.reshape(batch, heads, length, features)


def member_counts(members: Any, length: int, dtype: Any) -> Any:
    """count[b, h, t] = number of clusters whose member list holds t, (B, H, L) of ``dtype``."""
    xp = checks.array_namespace(members)
    batch, heads = members.shape[:2]
    filled = members >= 0
    counts = xp.bincount(flat_rows(members, length)[filled], minlength=batch * heads * length)
    return counts.reshape(batch, heads, length).astype(dtype)
