"""Gather and scatter of token rows through (B, H, C, W) member tensors (reference:
:mod:`refattn.routing.indexing`).

Differs from the reference: the gather is an autograd function whose backward adds the rows back
(:func:`add_rows_into`): on a CPU a C++ kernel (``routing_indexing.cpp``: each thread adds into its
own range of token rows, each row's terms in slot order; without g++ or under ``torch.compile``,
``index_add_``, which sorts the rows first and adds them in the same order), ``index_put_(accumulate=True)``
elsewhere (sorted and deterministic on CUDA, where ``index_add_`` adds atomically, in no fixed order);
the scatter is its mirror, whose backward gathers with ``index_select`` (several times faster on a CPU
than the advanced indexing of ``index_put_``'s own backward); scatters skip the masking of empty slots
when there are none.
"""

from __future__ import annotations

import torch

from .. import kernels

__all__ = ["flat_rows", "all_slots_filled", "add_rows_into", "add_rows", "GatherRows", "AddRows", "gather",
           "scatter_add", "member_counts"]


def flat_rows(members: torch.Tensor, length: int) -> torch.Tensor:
    """Row numbers into a (B * H * L, F) view for members (B, H, C, W), flattened; empty slots point
    at row 0 of their (b, h) (callers give them weight 0)."""
    batch, heads = members.shape[:2]
    base = torch.arange(batch * heads, device=members.device).reshape(batch, heads, 1, 1) * length
    return (base + members.clamp(min=0)).reshape(-1)


def all_slots_filled(*memberships: torch.Tensor) -> bool:
    """No empty slot (-1) in any of the memberships; always False under ``torch.compile`` (reading
    the answer is a graph break, and the compiled masked path is fused anyway)."""
    if torch.compiler.is_compiling():
        return False
    return all(bool((members >= 0).all()) for members in memberships)


def add_rows_into(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[rows[i]] += values[i] in place, in the order of i; returns out."""
    if kernels.available(out) and out.is_contiguous() and values.dtype == out.dtype and rows.dtype == torch.int64:
        return kernels.add_rows_into(out, rows, values)
    if out.device.type == "cpu":
        return out.index_add_(0, rows, values)
    return out.index_put_((rows,), values, accumulate=True)


def add_rows(total_rows: int, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[rows[i]] += values[i] into zeros (total_rows, F), in the order of i."""
    out = torch.zeros(total_rows, values.shape[-1], dtype=values.dtype, device=values.device)
    return add_rows_into(out, rows, values)


class GatherRows(torch.autograd.Function):
    """y = x[rows] for x (N, F) (``index_select``); its backward is :func:`add_rows`."""

    @staticmethod
    def forward(ctx, x, rows):  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.total_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return add_rows(ctx.total_rows, rows, dy), None


class AddRows(torch.autograd.Function):
    """out = :func:`add_rows` (total_rows, rows, values); its backward is dvalues = dout[rows] (``index_select``)."""

    @staticmethod
    def forward(ctx, values, rows, total_rows):  # type: ignore[override]
        ctx.save_for_backward(rows)
        return add_rows(total_rows, rows, values)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return dout.index_select(0, rows), None, None


def gather(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, F) -> (B, H, C, W, F), the rows of the members (empty slots: an arbitrary row)."""
    batch, heads, length, features = x.shape
    rows = GatherRows.apply(x.reshape(batch * heads * length, features), flat_rows(members, length))
    return rows.reshape(members.shape + (features,))


def scatter_add(values: torch.Tensor, members: torch.Tensor, length: int) -> torch.Tensor:
    """Sum values (B, H, C, W, F) into (B, H, L, F) at the members' positions; empty slots dropped."""
    batch, heads, clusters, window, features = values.shape
    if not all_slots_filled(members):
        filled = (members >= 0).unsqueeze(-1)
        values = torch.where(filled, values, torch.zeros((), dtype=values.dtype, device=values.device))
    out = AddRows.apply(values.reshape(-1, features), flat_rows(members, length), batch * heads * length)
    return out.reshape(batch, heads, length, features)


def member_counts(members: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """count[b, h, t], the number of slots holding t: (B, H, L) of ``dtype``."""
    batch, heads, clusters, window = members.shape
    filled = (members >= 0).reshape(batch, heads, clusters * window).to(dtype)
    index = members.clamp(min=0).reshape(batch, heads, clusters * window)
    return torch.zeros(batch, heads, length, dtype=dtype, device=members.device).scatter_add(2, index, filled)
