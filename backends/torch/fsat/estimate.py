"""FSAT step 2a on tensors (reference: :mod:`refattn.fsat.estimate`).

Differs from the reference: besides ``estimate`` of a given cross, :func:`estimate_of_cross` scores
the cross of a and b without forming it: the inverse FFT is linear, so the w-weighted sum of the Dc
spectra needs one inverse transform per (batch, head) instead of Dc. ``attention`` plans with it.
On a CPU, up to rows of :data:`KERNEL_ROW_BYTES`, the w-weighted spectrum is a kernel (``fsat_spectrum.cpp``:
each row transformed by MKL in cache, a chunk of features at a time). Elsewhere, or without it, the spectra of
one block of a head's features exist at a time (:func:`weighted_spectrum`): those of all heads are as large as
the cross, the largest tensor FSAT would otherwise hold.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refattn import checks
from refattn.fsat.estimate import OVERFLOWS

from .. import kernels
from ..tensors import check_overflows, checked, compute_dtype, tensors
from .cross import fft_length, has_pairs, inverse_counts, spectrum, unmasked, zero_padded

__all__ = [
    "estimate",
    "estimate_vjp",
    "check_estimate",
    "check_estimate_vjp",
    "estimate_core",
    "estimate_vjp_core",
    "estimate_of_cross",
    "scores",
    "feature_blocks",
    "spectrum_blocks",
    "spectrum_dtype",
    "WeightedCross",
    "weighted_spectrum",
    "cross_at_lags",
    "spectrum_vjp",
]

AXES = "(B, H, 2L - 1, Dc)"


def scores(dots: torch.Tensor, features: int, pairs: torch.Tensor | None) -> torch.Tensor:
    """The scores from the dot products <w, c_tau> (B, H, 2L - 1): scaled, -inf where ``pairs`` is False."""
    s = dots * (1.0 / math.sqrt(features))
    if pairs is None:
        return s
    return torch.where(pairs, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))


def spectrum_dtype(a: torch.Tensor) -> torch.dtype:
    """The complex dtype of a's spectra (complex64 for float32, complex128 for float64)."""
    return torch.promote_types(a.dtype, torch.complex64)


def estimate_core(c: torch.Tensor, w: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
    """s (B, H, 2L - 1) of c and w of one compute dtype; ``pairs`` from :func:`.cross.has_pairs`."""
    return scores(torch.einsum("bhtd,hd->bht", c, w), c.shape[3], pairs)


SPECTRUM_BYTES = 2**24
"""The largest block of spectra (B, 1, features, N // 2 + 1) :func:`spectrum_blocks` holds at once, where blocks
of :data:`MIN_BLOCK_FEATURES` fit in it: 16 MiB. Below glibc's largest dynamic mmap threshold (32 MiB), a freed
block's memory is reused from the heap for the next one; a larger block is mapped afresh and page-faulted in
every time (one head's 64 spectra at L = 65,536 are 32 MiB: their faults took a third of the transforms' time)."""
MIN_BLOCK_FEATURES = 16
"""The fewest features per block when a head's features go in several: each block reads the head's rows of a
and b again, with a stride. Where fewer fit in :data:`SPECTRUM_BYTES` a head's features go in one block (at
L = 1,048,576, blocks of eight took 1.15x as long as one block per head, median of 3 interleaved pairs; one
row at a time, the transforms took twice as long)."""


def feature_blocks(batch: int, length: int, features: int, itemsize: int) -> list[slice]:
    """The blocks of features whose spectra :func:`spectrum_blocks` computes together: as few as keep each
    (B, 1, features, N // 2 + 1) block within :data:`SPECTRUM_BYTES`, of equal size (22, 22, 20 rather than 31,
    31, 2), if :data:`MIN_BLOCK_FEATURES` fit; else all in one. ``itemsize``: that of a and b."""
    fitting = SPECTRUM_BYTES // (batch * (fft_length(length) // 2 + 1) * 2 * itemsize)
    count = -(-features // fitting) if fitting >= MIN_BLOCK_FEATURES else 1
    size = -(-features // count)
    return [slice(first, min(features, first + size)) for first in range(0, features, size)]


def spectrum_blocks(a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None):
    """Yield (head, features, :func:`.cross.spectrum` of those features of (a, b)): (B, 1, len(features),
    N // 2 + 1) complex, padded rows zeroed, head by head and block of features (:func:`feature_blocks`) by block.

    The blocks share one padded-rows buffer (:func:`.cross.padded_rows`): its padding is zeroed, and its
    pages faulted in, once."""
    batch, heads, length, features = a.shape
    blocks = feature_blocks(batch, length, features, a.element_size())
    rows = a.new_empty(batch, 1, blocks[0].stop, fft_length(length))
    rows[..., length:].zero_()
    for head in range(heads):
        for block in blocks:
            part = (slice(None), slice(head, head + 1), slice(None), block)
            yield head, block, spectrum(zero_padded(a[part], unpadded), zero_padded(b[part], unpadded), length,
                                        rows[:, :, : block.stop - block.start])


KERNEL_ROW_BYTES = 2**19
"""The longest padded row (N entries of a's dtype) whose spectra the kernel computes (``fsat_spectrum.cpp``: one row
at a time on each thread, in its cache): 512 KiB. Longer rows no longer fit a core's cache with their transform's
work, and torch.fft's batched transforms, threaded inside MKL, are as fast or faster (WeightedCross at H = 8,
Dc = 64, float32, medians of 3 to 5 interleaved rounds on the 2-vCPU Xeon: 350 against 630 ms at N = 2^17,
1.32 against 1.44 s at 2^18, 4.1 against 4.0 s at 2^19, 18.7 against 13.6 s at 2^21)."""


class WeightedCross(torch.autograd.Function):
    """numerator (B, H, 2L - 1) = sum_d w[h, d] cross(a, b)[b, h, :, d] (unnormalised: before 1 / n_tau),
    one inverse FFT of the w-weighted spectrum per (batch, head); differentiable in w only.

    The w-weighted spectrum: :func:`~refattn.backends.torch.kernels.weighted_spectrum` on a CPU where the kernel
    is built and the padded rows are within :data:`KERNEL_ROW_BYTES`, else :func:`weighted_spectrum`. The
    backward needs the cross at the offsets where dnumerator is nonzero: in ``attention`` only the K selected
    ones (the bias is s[offsets]), so it sums them directly from a and b (:func:`cross_at_lags`), a few passes
    over b instead of recomputing every spectrum; a dense dnumerator recomputes the spectra block by block.
    """

    @staticmethod
    def forward(ctx, w, a, b, unpadded):  # type: ignore[override]
        ctx.save_for_backward(a, b, unpadded)
        ctx.has_mask = unpadded is not None
        n = fft_length(a.shape[2])
        if n * a.element_size() <= KERNEL_ROW_BYTES and kernels.available(a, "fsat_spectrum"):
            mixed = kernels.weighted_spectrum(zero_padded(a, unpadded), zero_padded(b, unpadded), w.detach(), n)
        else:
            mixed = weighted_spectrum(w, a, b, unpadded)
        return torch.fft.irfft(mixed, n=n, dim=-1)[..., : 2 * a.shape[2] - 1]

    @staticmethod
    def backward(ctx, dnumerator):  # type: ignore[override]
        a, b, unpadded = ctx.saved_tensors
        unpadded = unpadded if ctx.has_mask else None
        lags = dnumerator != 0
        # Summing one lag is a pass over b; the recompute is two FFTs of Dc rows, about 2 log2 N passes.
        if lags.sum(dim=-1).max() <= 2 * math.log2(fft_length(a.shape[2])):
            return cross_at_lags(a, b, unpadded, dnumerator, lags), None, None, None
        return spectrum_vjp(a, b, unpadded, dnumerator), None, None, None


def weighted_spectrum(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None) -> torch.Tensor:
    """mixed (B, H, N // 2 + 1) = sum_d w[h, d] spectrum(a, b)[b, h, d] by ``torch.fft``, block of features by block
    (:func:`spectrum_blocks`)."""
    batch, heads, length, _ = a.shape
    mixed = a.new_zeros(batch, heads, 1, fft_length(length) // 2 + 1, dtype=spectrum_dtype(a))
    for head, block, product in spectrum_blocks(a, b, unpadded):
        mixed[:, head : head + 1] += torch.matmul(w[head : head + 1, None, block].to(product.dtype), product)
    return mixed[:, :, 0]


ROWS_PER_CHUNK_ELEMENTS = 2**20  # rows x Dc of the chunk summed at once: 4 MiB in float32


def cross_at_lags(a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None, dnumerator: torch.Tensor,
                  lags: torch.Tensor) -> torch.Tensor:
    """dw (H, Dc) = sum_{b, t} dnumerator[b, h, t] sum_i a[b, h, i, d] b[b, h, i + tau, d], tau = t - (L - 1),
    over the nonzero t only (``lags``): for each (batch, head), sum_i a[i] * y[i] with
    y[i] = sum_t dnumerator[t] b[i + tau], accumulated chunk by chunk of rows (y stays in cache)."""
    batch, heads, length, features = a.shape
    dw = a.new_zeros(heads, features)
    chunk = max(1, ROWS_PER_CHUNK_ELEMENTS // features)
    y = a.new_empty(min(chunk, length), features)
    where = lags.nonzero().tolist()  # (b, h, t) in row-major order: grouped by (b, h)
    weights = dnumerator[lags].tolist()
    start = 0
    while start < len(where):
        bi, head = where[start][:2]
        stop = start
        while stop < len(where) and where[stop][:2] == [bi, head]:
            stop += 1
        mask = None if unpadded is None else unpadded[bi : bi + 1]
        rows_a = zero_padded(a[bi : bi + 1, head : head + 1], mask)[0, 0]
        rows_b = zero_padded(b[bi : bi + 1, head : head + 1], mask)[0, 0]
        for first in range(0, length, chunk):
            last = min(length, first + chunk)
            y_chunk = y[: last - first].zero_()
            for (_, _, t), weight in zip(where[start:stop], weights[start:stop], strict=True):
                tau = t - (length - 1)
                low, high = max(first, -tau), min(last, length - tau)  # 0 <= i + tau < L
                if low < high:
                    y_chunk[low - first : high - first].add_(rows_b[low + tau : high + tau], alpha=weight)
            dw[head] += y_chunk.mul_(rows_a[first:last]).sum(dim=0)  # vecdot's products, in place: no temporary
        start = stop
    return dw


def spectrum_vjp(a: torch.Tensor, b: torch.Tensor, unpadded: torch.Tensor | None,
                 dnumerator: torch.Tensor) -> torch.Tensor:
    """dw (H, Dc) of a dense dnumerator: through the inverse FFT's adjoint, then the spectra recomputed block by
    block."""
    batch, heads, length, features = a.shape
    with torch.enable_grad():
        mixed = torch.zeros(batch, heads, fft_length(length) // 2 + 1, dtype=spectrum_dtype(a), device=a.device,
                            requires_grad=True)
        numerator = torch.fft.irfft(mixed, n=fft_length(length), dim=-1)[..., : 2 * length - 1]
        (dmixed,) = torch.autograd.grad(numerator, mixed, dnumerator)
    per_batch = a.new_empty(batch, heads, 1, features, dtype=mixed.dtype)
    for head, block, product in spectrum_blocks(a, b, unpadded):
        per_batch[:, head : head + 1, :, block] = torch.matmul(dmixed[:, head : head + 1, None, :], product.mH)
    return per_batch.sum(dim=0)[:, 0].real


def estimate_of_cross(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
                      unpadded: torch.Tensor | None) -> torch.Tensor:
    """estimate(cross(a, b), w) without forming the cross: one inverse FFT of the w-weighted spectrum.

    a and b are constants (step 4 cuts the estimator path from q and k); s is differentiable in w
    through :class:`WeightedCross`, which holds one head's spectra at a time.
    """
    length, features = a.shape[2], a.shape[3]
    numerator = WeightedCross.apply(w, a.detach(), b.detach(), unpadded)  # (B, H, 2L - 1)
    inverse = inverse_counts(length, unpadded, a.device, a.dtype)[..., 0]  # (B or 1, 1, 2L - 1)
    return scores(numerator * inverse, features, has_pairs(length, unpadded, a.device))


@checked
def check_estimate(c: Any, w: Any, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Validate the arguments of :func:`estimate`; returns them in that order."""
    c, w, key_padding_mask = tensors(c=c, w=w, key_padding_mask=key_padding_mask)
    checks.sequence(c, "c", AXES)
    batch, heads, count, features = c.shape
    length = checks.length_from_offsets(count, "c")
    checks.float_array(w, "w", rank=2, axes="(H, Dc)")
    checks.expect_shape(w, "w", (heads, features), "(H, Dc)")
    return c, w, checks.padding_mask(key_padding_mask, batch, length)


def estimate(c: Any, w: Any, *, key_padding_mask: Any = None) -> torch.Tensor:
    """The scores s (B, H, 2L - 1) of c's dtype (w is cast to c's compute dtype), differentiable in c and w."""
    c, w, mask = check_estimate(c, w, key_padding_mask)
    cd = compute_dtype(c.dtype)
    cc, wc = c.to(cd), w.to(cd)
    s = estimate_core(cc, wc, has_pairs((c.shape[2] + 1) // 2, unmasked(mask), c.device))
    check_overflows(s, OVERFLOWS["estimate"], c=cc, w=wc)
    return s.to(c.dtype)


@checked
def check_estimate_vjp(c: Any, w: Any, ds: Any, key_padding_mask: Any = None) -> tuple[Any, ...]:
    """Validate the arguments of :func:`estimate_vjp`; returns them in that order."""
    c, w, ds, key_padding_mask = tensors(c=c, w=w, ds=ds, key_padding_mask=key_padding_mask)
    c, w, mask = check_estimate(c, w, key_padding_mask)
    checks.float_array(ds, "ds", rank=3, axes="(B, H, 2L - 1)")
    checks.expect_shape(ds, "ds", tuple(c.shape[:3]), "(B, H, 2L - 1)")
    return c, w, ds, mask


def estimate_vjp_core(c: torch.Tensor, w: torch.Tensor, ds: torch.Tensor,
                      pairs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dc, dw) of tensors of one compute dtype; ``ds`` where ``pairs`` is False is ignored."""
    if pairs is not None:
        ds = torch.where(pairs, ds, torch.zeros((), dtype=ds.dtype, device=ds.device))
    ds = ds * (1.0 / math.sqrt(c.shape[3]))
    return ds[..., None] * w[None, :, None, :], torch.einsum("bht,bhtd->hd", ds, c)


def estimate_vjp(c: Any, w: Any, ds: Any, *, key_padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dc (B, H, 2L - 1, Dc), dw (H, Dc)) of c's and w's dtypes."""
    c, w, ds, mask = check_estimate_vjp(c, w, ds, key_padding_mask)
    cd = compute_dtype(c.dtype)
    cc, wc, dsc = c.to(cd), w.to(cd), ds.to(cd)
    with torch.no_grad():
        dc, dw = estimate_vjp_core(cc, wc, dsc, has_pairs((c.shape[2] + 1) // 2, unmasked(mask), c.device))
    check_overflows((dc, dw), OVERFLOWS["estimate_vjp"], c=cc, w=wc, ds=dsc)
    return dc.to(c.dtype), dw.to(w.dtype)
