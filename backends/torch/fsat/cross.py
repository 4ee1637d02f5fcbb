"""FSAT step 1 on tensors (reference: :mod:`refattn.fsat.cross`).

Differs from the reference: ``cross`` is a ``torch.autograd.Function`` whose backward is the
explicit VJP (it saves a and b only); each FFT reads the sequence axis moved last and contiguous;
the spectrum (:func:`spectrum`) is also the seam of the estimate, which mixes it before the inverse
transform (:func:`refattn.backends.torch.fsat.estimate.estimate_of_cross`). The pair counts are
computed in float64 and rounded (exact), on the mask's device.
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks
from refattn.fsat.cross import OVERFLOWS, next_fast_len

from .. import kernels
from ..tensors import check_overflows, checked, compute_dtype, same_dtype, tensors

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "check_cross",
    "check_cross_vjp",
    "cross_core",
    "cross_vjp_core",
    "Cross",
    "fft_length",
    "counts",
    "inverse_counts",
    "has_pairs",
    "padded_rows",
    "spectrum",
    "zero_padded",
    "unmasked",
]

AXES = "(B, H, L, Dc)"


def fft_length(length: int) -> int:
    """N = next_fast_len(2L - 1): no wrap-around reaches the 2L - 1 entries the convolutions keep."""
    return next_fast_len(2 * length - 1)


def counts(length: int, unpadded: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """n_tau as a float64 (B or 1, 2L - 1) tensor; exact integers (FFT in float64, rounded)."""
    if unpadded is None:
        tau = torch.arange(-(length - 1), length, device=device, dtype=torch.float64)
        return (length - tau.abs())[None, :]
    valid = unpadded.to(torch.float64)
    n = fft_length(length)
    product = torch.fft.rfft(valid.flip(-1), n=n, dim=-1) * torch.fft.rfft(valid, n=n, dim=-1)
    return torch.fft.irfft(product, n=n, dim=-1)[:, : 2 * length - 1].round()


def inverse_counts(length: int, unpadded: torch.Tensor | None, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """1 / n_tau as a (B or 1, 1, 2L - 1, 1) tensor of ``dtype``, 0 where n_tau = 0."""
    n = counts(length, unpadded, device)
    inverse = torch.where(n > 0, 1.0 / n.clamp(min=1.0), torch.zeros_like(n))
    return inverse.to(dtype)[:, None, :, None]


def has_pairs(length: int, unpadded: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """(B, 1, 2L - 1) bool "n_tau > 0", or None without padding (every offset has a pair)."""
    if unpadded is None:
        return None
    return (counts(length, unpadded, device) > 0)[:, None, :]


TRANSPOSE_CHUNK_ROWS = 4096  # rows of x moved per transposing copy: 1 MiB of float32 at F = 64, read from cache


def padded_rows(x: torch.Tensor, n: int, *, reverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, L, F) as rows (B, H, F, n) zero-padded to n, the layout the FFT reads, in one buffer
    (``rfft(rows, n=n)`` of the transposed rows would hold two: the contiguous rows and their padded copy);
    ``reverse``: x reversed along the sequence. ``out``, if given, is such a buffer whose padding is zero
    already (reused: only its first L columns are written).

    On a CPU one head at a time, the copy is a kernel (``fsat_cross.cpp``) that reads a tile of positions once
    and writes its rows, reversed or not, from cache. Elsewhere it goes a chunk of rows at a time (each
    reversed in cache when ``reverse``): one copy of all L rows strides through memory and takes about twice
    as long, and a reversed copy of x would be one more pass."""
    length = x.shape[2]
    rows = x.new_empty(x.shape[:2] + (x.shape[3], n)) if out is None else out
    if x.shape[1] == 1 and rows.is_contiguous() and kernels.available(x):  # fsat_cross.cpp: one pass, in cache
        kernels.padded_rows(x, rows, reverse)
    else:
        _copy_rows(x, rows, reverse)
    if out is None:
        rows[..., length:].zero_()  # only the padding: zeroing all of it first wrote every row twice
    return rows


def _copy_rows(x: torch.Tensor, rows: torch.Tensor, reverse: bool) -> None:
    """The transposing copy of :func:`padded_rows` by torch operations, a chunk of rows at a time."""
    length = x.shape[2]
    for start in range(0, length, TRANSPOSE_CHUNK_ROWS):
        stop = min(length, start + TRANSPOSE_CHUNK_ROWS)
        chunk = x[:, :, start:stop].transpose(2, 3)
        if reverse:
            rows[..., length - stop : length - start] = chunk.flip(3)
        else:
            rows[..., start:stop] = chunk


def spectrum(a: torch.Tensor, b: torch.Tensor, length: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """rfft(reverse(a)) * rfft(b) along the sequence, zero-padded to N = :func:`fft_length`:
    (B, H, Dc, N // 2 + 1) complex, whose irfft[..., :2L - 1] is the cross numerator. ``rows``: a
    :func:`padded_rows` buffer (zero padding) to build both operands' rows in, one after the other."""
    n = fft_length(length)
    product = torch.fft.rfft(padded_rows(a, n, reverse=True, out=rows), dim=-1)  # a's rows go before b's are built
    return product.mul_(torch.fft.rfft(padded_rows(b, n, out=rows), dim=-1))  # in place: one spectrum fewer at the peak


def unmasked(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """~key_padding_mask (True = a real token), or None: the form the cores take."""
    return None if key_padding_mask is None else ~key_padding_mask


def zero_padded(x: torch.Tensor, unpadded: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, L, F) with the rows of padded positions replaced by zeros."""
    if unpadded is None:
        return x
    return torch.where(unpadded[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def cross_core(a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None) -> torch.Tensor:
    """c (B, H, 2L - 1, Dc) of tensors of one compute dtype; ``unpadded`` = ~key_padding_mask or None."""
    length = a.shape[2]
    product = spectrum(zero_padded(a, unpadded), zero_padded(b, unpadded), length)
    numerator = torch.fft.irfft(product, n=fft_length(length), dim=-1)[..., : 2 * length - 1].transpose(2, 3)
    return numerator * inverse_counts(length, unpadded, a.device, a.dtype)


def cross_vjp_core(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                   unpadded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) of tensors of one compute dtype, by FFTs of length N = :func:`fft_length`."""
    length = a.shape[2]
    a = zero_padded(a, unpadded)
    b = zero_padded(b, unpadded)
    g = dc * inverse_counts(length, unpadded, a.device, a.dtype)
    n = fft_length(length)
    da = torch.fft.irfft(torch.fft.rfft(b, n=n, dim=2) * torch.fft.rfft(g.flip(2), n=n, dim=2), n=n, dim=2)
    db = torch.fft.irfft(torch.fft.rfft(a, n=n, dim=2) * torch.fft.rfft(g, n=n, dim=2), n=n, dim=2)
    da = zero_padded(da[:, :, length - 1 : 2 * length - 1], unpadded)
    db = zero_padded(db[:, :, length - 1 : 2 * length - 1], unpadded)
    return da, db


class Cross(torch.autograd.Function):
    """c = cross(a, b) with :func:`cross_vjp_core` as backward (saves a and b only)."""

    @staticmethod
    def forward(ctx, a, b, unpadded):  # type: ignore[override]
        ctx.save_for_backward(a, b, unpadded)
        ctx.has_mask = unpadded is not None
        return cross_core(a, b, unpadded)

    @staticmethod
    def backward(ctx, dc):  # type: ignore[override]
        a, b, unpadded = ctx.saved_tensors
        da, db = cross_vjp_core(a, b, dc, unpadded if ctx.has_mask else None)
        return da, db, None


@checked
def check_pair_counts(length: Any, key_padding_mask: Any = None) -> tuple[int, torch.Tensor | None]:
    """Validate the arguments of :func:`pair_counts`; returns them in that order."""
    length = checks.integer_in_range(length, "length", low=1)
    (mask,) = tensors(key_padding_mask=key_padding_mask)
    return length, checks.padding_mask(mask, None, length)


def pair_counts(length: int, key_padding_mask: Any = None) -> torch.Tensor:
    """n_tau, (1, 2L - 1) int64 on the CPU without a mask, (B, 2L - 1) on the mask's device with one."""
    length, mask = check_pair_counts(length, key_padding_mask)
    if mask is None:
        return counts(length, None, torch.device("cpu")).long()
    return counts(length, ~mask, mask.device).long()


@checked
def check_cross(a: Any, b: Any, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Validate the arguments of :func:`cross`; returns them in that order (tensors unchanged)."""
    a, b, key_padding_mask = tensors(a=a, b=b, key_padding_mask=key_padding_mask)
    checks.sequence(a, "a", AXES)
    checks.sequence(b, "b", AXES, tuple(a.shape[:3]), feature=a.shape[3])
    same_dtype(a=a, b=b)
    return a, b, checks.padding_mask(key_padding_mask, a.shape[0], a.shape[2])


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """The cross c (B, H, 2L - 1, Dc) of a's dtype, differentiable in a and b."""
    a, b, mask = check_cross(a, b, key_padding_mask)
    cd = compute_dtype(a.dtype)
    ac, bc = a.to(cd), b.to(cd)
    c = Cross.apply(ac, bc, unmasked(mask))
    check_overflows(c, OVERFLOWS["cross"], a=ac, b=bc)
    return c.to(a.dtype)


@checked
def check_cross_vjp(a: Any, b: Any, dc: Any, key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`cross_vjp`; returns them in that order."""
    a, b, dc, key_padding_mask = tensors(a=a, b=b, dc=dc, key_padding_mask=key_padding_mask)
    a, b, mask = check_cross(a, b, key_padding_mask)
    batch, heads, length, features = a.shape
    checks.sequence(dc, "dc", "(B, H, 2L - 1, Dc)", (batch, heads, 2 * length - 1), feature=features)
    return a, b, dc, mask


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db), each (B, H, L, Dc) of a's dtype; padded rows 0."""
    a, b, dc, mask = check_cross_vjp(a, b, dc, key_padding_mask)
    cd = compute_dtype(a.dtype)
    ac, bc, dcc = a.to(cd), b.to(cd), dc.to(cd)
    with torch.no_grad():
        da, db = cross_vjp_core(ac, bc, dcc, unmasked(mask))
    check_overflows((da, db), OVERFLOWS["cross_vjp"], a=ac, b=bc, dc=dcc)
    return da.to(a.dtype), db.to(a.dtype)
