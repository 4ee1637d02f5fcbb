"""FSAT step 1 on the device (:mod:`refattn.fsat.cross`, whose checks it runs).

How it differs from the reference: the convolutions are the device's real FFTs of :mod:`..fft`
(lengths a power of two, each input transformed on its own, buffers bounded by chunks of rows);
the pair counts are computed once per call (:class:`Pairs`): in closed form without a mask, with
one as the float64 FFT autocorrelation of the validity rounded to integers, as the reference does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import cuda, float64

from refattn.fsat.cross import OVERFLOWS, check_cross, check_cross_vjp, check_pair_counts

from ..fft import convolve
from ..kernels import KernelTable, registry
from ..runtime import Call, intake

__all__ = ["pair_counts", "cross", "cross_vjp", "Pairs", "pairs", "cross_core", "cross_vjp_core"]


class Pairs(NamedTuple):
    """The pair counts of one call, on the device: n (B or 1, 2L - 1) int64, 1 / n (0 where n = 0) and the
    validity (B or 1, L), 1 where unpadded, in the compute dtype."""

    counts: Any
    inverse: Any
    valid: Any


def valid_rows(call: Call, mask: np.ndarray | None, length: int, dtype: Any = None) -> Any:
    """(B or 1, L) on the device, 1.0 where unpadded (all ones without a mask)."""
    dtype = np.dtype(call.dtype if dtype is None else dtype)
    if mask is None:
        return call.full((1, length), 1.0, dtype)
    return call.upload(~mask, dtype)


def pair_counts_core(call: Call, length: int, mask: np.ndarray | None) -> Any:
    """n (B or 1, 2L - 1) int64 on the device."""
    counts = call.empty((1 if mask is None else mask.shape[0], 2 * length - 1), np.int64)
    if mask is None:
        call.flat("pair_counts_k", counts.size, length, counts)
        return counts
    valid = valid_rows(call, mask, length, np.float64)
    rows = valid.reshape(valid.shape[0], 1, length, 1)
    correlation = call.empty((valid.shape[0], 1, 2 * length - 1, 1), np.float64)
    convolve(call, rows, valid, True, rows, valid, False, 0, correlation, call.full((1, 2 * length - 1), 1.0,
                                                                                   np.float64))
    call.flat("rounded_counts_k", counts.size, correlation, counts, dtype=np.float64)
    return counts


def pairs(call: Call, length: int, mask: np.ndarray | None) -> Pairs:
    """The counts, their inverses and the validity of one call."""
    counts = pair_counts_core(call, length, mask)
    inverse = call.empty(counts.shape)
    call.flat("inverse_counts_k", counts.size, counts, inverse)
    return Pairs(counts, inverse, valid_rows(call, mask, length))


def pair_counts(length: int, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.fsat.pair_counts` on the device."""
    call, (length, key_padding_mask) = intake(check_pair_counts, length, key_padding_mask)
    return call.out(pair_counts_core(call, length, key_padding_mask))


def cross_core(call: Call, a: Any, b: Any, pairs: Pairs) -> Any:
    """c (B, H, 2L - 1, Dc) = (reversed a' conv b') / n, a' and b' the inputs with padded rows zeroed."""
    batch, heads, length, features = a.shape
    c = call.empty((batch, heads, 2 * length - 1, features))
    convolve(call, a, pairs.valid, True, b, pairs.valid, False, 0, c, pairs.inverse)
    return c


def cross(a: Any, b: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`refattn.fsat.cross` on the device."""
    call, (a, b, key_padding_mask) = intake(check_cross, a, b, key_padding_mask)
    c = cross_core(call, a, b, pairs(call, a.shape[2], key_padding_mask))
    call.watch_rules(c, OVERFLOWS["cross"], a=a, b=b)
    return call.out(c)


def cross_vjp_core(call: Call, a: Any, b: Any, dc: Any, pairs: Pairs) -> tuple[Any, Any]:
    """(da, db): the middle L entries of (b' conv reversed g) and (a' conv g), g = dc / n, times the validity."""
    length = a.shape[2]
    da = call.empty(a.shape)
    db = call.empty(a.shape)
    convolve(call, b, pairs.valid, False, dc, pairs.inverse, True, length - 1, da, pairs.valid)
    convolve(call, a, pairs.valid, False, dc, pairs.inverse, False, length - 1, db, pairs.valid)
    return da, db


def cross_vjp(a: Any, b: Any, dc: Any, *, key_padding_mask: Any = None) -> tuple[Any, Any]:
    """:func:`refattn.fsat.cross_vjp` on the device."""
    call, (a, b, dc, key_padding_mask) = intake(check_cross_vjp, a, b, dc, key_padding_mask)
    da, db = cross_vjp_core(call, a, b, dc, pairs(call, a.shape[2], key_padding_mask))
    call.watch_rules((da, db), OVERFLOWS["cross_vjp"], a=a, b=b, dc=dc)
    return call.out(da, db)


def kernels(dt: Any) -> KernelTable:
    """The pair-count kernels for the float type ``dt``."""
    table, kernel = registry()

    @kernel("i I2")
    def pair_counts_k(length, counts):
        """n[0, t] = L - |t - (L - 1)|: every pair of the diagonal is valid without a mask."""
        t = cuda.grid(1)
        if t < counts.shape[1]:
            counts[0, t] = length - abs(t - (length - 1))

    if dt == float64:
        @kernel("F4 I2")
        def rounded_counts_k(correlation, counts):
            """n[b, t] = the float64 autocorrelation of the validity, rounded (exact: its error is far below 1/2)."""
            idx = cuda.grid(1)
            if idx < counts.size:
                b, t = idx // counts.shape[1], idx % counts.shape[1]
                counts[b, t] = int(correlation[b, 0, t, 0] + 0.5)

    @kernel("I2 F2")
    def inverse_counts_k(counts, inverse):
        """1 / n, and 0 where n = 0."""
        idx = cuda.grid(1)
        if idx < counts.size:
            n = counts[idx // counts.shape[1], idx % counts.shape[1]]
            inverse[idx // counts.shape[1], idx % counts.shape[1]] = dt(1.0) / dt(n) if n > 0 else dt(0.0)

    return table
