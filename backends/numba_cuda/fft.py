"""Linear convolution along the sequence axis by real FFTs on the device, and its NumPy emulation.

The reference convolves with SciPy's real FFTs. Here, per row (b, h, feature) of the two inputs:

- each real sequence of length N (a power of two, N >= the convolution's length) is transformed on
  its own, as a complex sequence of length M = N / 2 (even samples real, odd samples imaginary)
  followed by the split into its spectrum: every spectrum carries its own signal only (packing two
  different signals in one transform resolves the smaller only to ε·|larger|: wrong float32
  gradients of the cross at long L);
- the complex FFTs are self-sorting (Stockham) passes of radix up to 1,024 / C, each pass one launch
  that runs its radix-R DFTs in shared memory (log2 R radix-2 stages there), so a transform of
  M = 2^20 points is three passes, not twenty;
- the buffers hold the FFTs of a chunk of rows at a time, laid out (M, rows) so that every load and
  store of a pass reads C consecutive rows (one 32-byte sector): at most ``FFT_BUDGET_BYTES``
  however long the sequences and however many the rows.

``emulate_*`` repeat every kernel's arithmetic in NumPy, operation for operation in the same dtype
(twiddles from the same table), so that the float32 error of the device FFT can be measured at
lengths the simulator cannot reach: a test checks the emulation against the kernels in the
simulator, and the emulation against a float64 FFT at L >= 262,144.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from . import device
from .device import unravel3
from .kernels import KernelTable, registry
from .runtime import Call

FFT_BUDGET_BYTES = 256 * 1024 * 1024  # the FFT buffers of one chunk of rows
SECTOR_BYTES = 32  # a pass reads and writes whole sectors: C = 32 bytes / itemsize consecutive rows
FFT_SHARED = 1_024  # complex values a pass holds in shared memory (C columns x the radix)
BUFFERS = 6  # (M, rows) arrays per chunk: three complex buffers, real and imaginary parts


@dataclass(frozen=True)
class FFTPlan:
    """The transforms of one convolution: N-point real FFTs as M = N / 2-point complex ones, in passes of
    ``radices``, over ``rows`` rows, ``chunk`` rows at a time, C = ``columns`` rows per block."""

    size: int
    radices: tuple[int, ...]
    rows: int
    chunk: int
    columns: int

    @property
    def half(self) -> int:
        return self.size // 2


def pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def fft_plan(length: int, rows: int, itemsize: int, max_radix: int | None = None,
             budget: int = FFT_BUDGET_BYTES) -> FFTPlan:
    """The plan of the real FFTs for a convolution of ``length`` outputs over ``rows`` rows: passes of
    radix at most ``max_radix`` (default: what shared memory holds), buffers within ``budget`` bytes
    (or one row's, if larger)."""
    size = max(2, pow2_at_least(length))
    half = size // 2
    most = max(1, min(rows, budget // (BUFFERS * half * itemsize)))
    chunk = -(-rows // -(-rows // most))  # the rows split evenly: no chunk mostly empty
    columns = min(SECTOR_BYTES // itemsize, chunk)
    largest = FFT_SHARED // columns if max_radix is None else min(max_radix, FFT_SHARED // columns)
    bits, most = int(math.log2(half)), int(math.log2(largest))
    passes = -(-bits // most) if bits else 0
    radices = tuple(1 << (bits // passes + (1 if p < bits % passes else 0)) for p in range(passes))
    return FFTPlan(size, radices, rows, chunk, columns)


@functools.lru_cache(maxsize=32)
def twiddle_table(size: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """exp(-2 pi i t / N) for t < N / 2, computed in float64 and rounded to ``dtype``."""
    angle = 2.0 * np.pi * np.arange(size // 2) / size
    return np.cos(angle).astype(dtype), (-np.sin(angle)).astype(dtype)


# ------------------------------------------------------------------------------ the device side


def convolve(call: Call, x: Any, x_weight: Any, x_reverse: bool, y: Any, y_weight: Any, y_reverse: bool,
             offset: int, out: Any, out_weight: Any, *, max_radix: int | None = None,
             budget: int = FFT_BUDGET_BYTES) -> None:
    """out[b, h, t, f] = out_weight[b', t] * (x' * y')[t + offset], the full linear convolution of the rows

        x'[n] = x[b, h, n, f] * x_weight[b', n]   (n read backwards when ``x_reverse``),  y' likewise,

    b' = b, or 0 for a weight of one row. x (B, H, Lx, F), y (B, H, Ly, F), out (B, H, T, F) with
    T + offset <= Lx + Ly - 1; the weights (B or 1, ·) in the dtype of x. ``max_radix`` and ``budget``
    as :func:`fft_plan` takes them (tests force several passes and chunks at small sizes with them).
    """
    batch, heads, _, features = x.shape
    plan = fft_plan(x.shape[2] + y.shape[2] - 1, batch * heads * features, x.dtype.itemsize, max_radix, budget)
    dtype = np.dtype(x.dtype)
    half = plan.half
    tw = call.constant(("twiddles", plan.size, dtype.name), lambda: twiddle_table(plan.size, dtype.name))
    buffers = [(call.empty((half, plan.chunk), dtype), call.empty((half, plan.chunk), dtype)) for _ in range(3)]
    for row0 in range(0, plan.rows, plan.chunk):
        count = min(plan.chunk, plan.rows - row0)
        _load(call, plan, x, x_weight, x_reverse, row0, count, buffers[0])
        spectrum_x, free = _transform(call, plan, buffers[0], buffers[1], tw, 1)
        _load(call, plan, y, y_weight, y_reverse, row0, count, free)
        spectrum_y, free = _transform(call, plan, free, buffers[2], tw, 1)
        call.flat("fft_split_k", half * plan.chunk, *spectrum_x, *spectrum_y, *tw, *free, dtype=dtype)
        result, _ = _transform(call, plan, free, spectrum_x, tw, -1)
        call.flat("fft_store_k", out.shape[2] * count, *result, row0, count, offset, dtype.type(1.0 / half),
                  out_weight, out, dtype=dtype)


def _load(call: Call, plan: FFTPlan, x: Any, weight: Any, reverse: bool, row0: int, count: int,
          buffer: tuple[Any, Any]) -> None:
    call.flat("fft_load_k", plan.half * plan.chunk, x, weight, int(reverse), row0, count, *buffer,
              dtype=x.dtype)


def _transform(call: Call, plan: FFTPlan, source: tuple[Any, Any], target: tuple[Any, Any], tw: tuple[Any, Any],
               direction: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The M-point complex FFT (``direction`` 1) or its unnormalised inverse (-1) of every column of
    ``source``: one launch per pass; returns (the buffer holding the result, the other one)."""
    stride = 1
    tiles = -(-plan.chunk // plan.columns)
    dtype = source[0].dtype
    for radix in plan.radices:
        groups = plan.half // radix
        call.launch("fft_pass_k", groups * tiles, (plan.columns, radix // 2), *source, *target, *tw, stride,
                    direction, dtype=dtype)
        source, target = target, source
        stride *= radix
    return source, target


def kernels(dt: Any) -> KernelTable:
    """The FFT kernels for the float type ``dt``."""
    ZERO = dt(0.0)
    HALF = dt(0.5)
    fn = device.functions(dt)
    twiddle = fn.twiddle
    table, kernel = registry()

    @kernel("F4 F2 i i i F2 F2")
    def fft_load_k(x, weight, reverse, row0, count, zr, zi):
        """zr[n, r] + i zi[n, r] = x'[2n] + i x'[2n + 1] of row row0 + r < row0 + count (zeros past the
        chunk's rows and past the sequence); one thread per (n, r), r fastest: consecutive features."""
        idx = cuda.grid(1)
        if idx >= zr.size:
            return
        n, r = idx // zr.shape[1], idx % zr.shape[1]
        length = x.shape[2]
        b, h, f = unravel3(row0 + r, x.shape[1], x.shape[3])
        wb = b if weight.shape[0] > 1 else 0
        even = ZERO
        odd = ZERO
        if r < count:
            t = 2 * n
            if t < length:
                src = length - 1 - t if reverse else t
                even = x[b, h, src, f] * weight[wb, src]
            if t + 1 < length:
                src = length - 2 - t if reverse else t + 1
                odd = x[b, h, src, f] * weight[wb, src]
        zr[n, r] = even
        zi[n, r] = odd

    @cuda.jit(device=True, inline=True)
    def slot(j, cols, c):
        """Where value j of column c lies in a pass's shared arrays: row j moved within its group of four
        rows to j's base-4 digits XOR-folded (d0 ^ -d1 ^ -d2 ^ ..., mod 4). A (half-)warp touches four
        rows at once, each row C columns = 32 bytes, a quarter of the banks; the fold puts those four rows
        in the four quarters for every access of the pass (row j * C alone: 2-way conflicts on the stores)."""
        g = j & 3
        rest = j >> 2
        while rest:
            g ^= (3 * rest) & 3
            rest >>= 2
        return ((j >> 2) * 4 + g) * cols + c

    @kernel("F2 F2 F2 F2 F1 F1 i i", shared=4 * FFT_SHARED * (dt.bitwidth // 8))
    def fft_pass_k(xr, xi, yr, yi, twr, twi, stride, direction):
        """One self-sorting pass of radix R = 2 * blockDim.y over every column of (x) into (y):

            y[q + s (R p + k)] = W_n^(p k) sum_j x[q + s (p + j m)] W_R^(j k),   s = ``stride``, n = M / s, m = n / R

        Block (C columns, R / 2 butterflies) for the group u = p s + q (the reads x[u + j M / R] of C
        consecutive columns are contiguous); the R-point DFT as log2 R radix-2 Stockham stages in
        shared memory (at :func:`slot`: conflict-free). ``direction``
        -1 conjugates every twiddle (the unnormalised inverse).
        """
        sr = cuda.shared.array(FFT_SHARED, dt)
        si = cuda.shared.array(FFT_SHARED, dt)
        tr = cuda.shared.array(FFT_SHARED, dt)
        ti = cuda.shared.array(FFT_SHARED, dt)
        half, columns = xr.shape
        size_tw = twr.shape[0]
        cols = cuda.blockDim.x
        butterflies = cuda.blockDim.y
        radix = 2 * butterflies
        span = half // radix  # the groups, M / R
        c = cuda.threadIdx.x
        t = cuda.threadIdx.y
        u = cuda.blockIdx.x % span
        col = (cuda.blockIdx.x // span) * cols + c
        inside = col < columns
        sign = dt(direction)
        for j in range(t, radix, butterflies):  # t and t + R / 2
            at = slot(j, cols, c)
            sr[at] = xr[u + j * span, col] if inside else ZERO
            si[at] = xi[u + j * span, col] if inside else ZERO
        inner = 1
        flip = False
        while inner < radix:
            cuda.syncthreads()
            p = t // inner
            q = t - p * inner
            reach = butterflies  # = inner * (sub-length / 2)
            wr, wi = twiddle(twr, twi, 2 * p * inner * span, size_tw)
            wi = sign * wi
            first = slot(q + inner * p, cols, c)
            second = slot(q + inner * p + reach, cols, c)
            if flip:
                ar, ai = tr[first], ti[first]
                br, bi = tr[second], ti[second]
            else:
                ar, ai = sr[first], si[first]
                br, bi = sr[second], si[second]
            dr = ar - br
            di = ai - bi
            low = slot(q + 2 * inner * p, cols, c)
            high = slot(q + inner * (2 * p + 1), cols, c)
            if flip:
                sr[low], si[low] = ar + br, ai + bi
                sr[high], si[high] = dr * wr - di * wi, dr * wi + di * wr
            else:
                tr[low], ti[low] = ar + br, ai + bi
                tr[high], ti[high] = dr * wr - di * wi, dr * wi + di * wr
            flip = not flip
            inner *= 2
        cuda.syncthreads()
        p = u // stride
        q = u - p * stride
        for k in range(t, radix, butterflies):
            at = slot(k, cols, c)
            if flip:
                vr, vi = tr[at], ti[at]
            else:
                vr, vi = sr[at], si[at]
            wr, wi = twiddle(twr, twi, 2 * p * k * stride, size_tw)
            wi = sign * wi
            if inside:
                target = q + stride * (radix * p + k)
                yr[target, col] = vr * wr - vi * wi
                yi[target, col] = vr * wi + vi * wr

    @cuda.jit(device=True, inline=True)
    def spectrum(zr, zi, k, col, twr, twi):
        """X[k] of the real sequence x whose M-point transform is Z (x even + i x odd), k in [0, M]:
        X[k] = E[k] + W_N^k O[k], E = (Z[k] + conj Z[M - k]) / 2, O = (Z[k] - conj Z[M - k]) / 2i."""
        half = zr.shape[0]
        k0 = k % half
        k1 = (half - k) % half
        ar, ai = zr[k0, col], zi[k0, col]
        cr, ci = zr[k1, col], -zi[k1, col]
        er, ei = HALF * (ar + cr), HALF * (ai + ci)
        orr, oi = HALF * (ai - ci), -HALF * (ar - cr)
        wr, wi = twiddle(twr, twi, k, half)
        return er + (wr * orr - wi * oi), ei + (wr * oi + wi * orr)

    @kernel("F2 F2 F2 F2 F1 F1 F2 F2")
    def fft_split_k(xr, xi, yr, yi, twr, twi, pr, pi):
        """(pr + i pi)[k] = the M-point transform of the real sequence p = x * y (spectra P = X Y), from
        the transforms of x and y: Zp[k] = Ep[k] + i Op[k], Ep = (P[k] + conj P[M - k]) / 2,
        Op = (P[k] - conj P[M - k]) conj(W_N^k) / 2. One thread per (k, column)."""
        idx = cuda.grid(1)
        half, columns = xr.shape
        if idx >= half * columns:
            return
        k = idx // columns
        col = idx - k * columns
        xr0, xi0 = spectrum(xr, xi, k, col, twr, twi)
        yr0, yi0 = spectrum(yr, yi, k, col, twr, twi)
        xr1, xi1 = spectrum(xr, xi, half - k, col, twr, twi)
        yr1, yi1 = spectrum(yr, yi, half - k, col, twr, twi)
        p0r, p0i = xr0 * yr0 - xi0 * yi0, xr0 * yi0 + xi0 * yr0
        p1r, p1i = xr1 * yr1 - xi1 * yi1, -(xr1 * yi1 + xi1 * yr1)  # conj P[M - k]
        er, ei = HALF * (p0r + p1r), HALF * (p0i + p1i)
        dr, di = HALF * (p0r - p1r), HALF * (p0i - p1i)
        wr, wi = twiddle(twr, twi, k, half)
        orr, oi = dr * wr + di * wi, di * wr - dr * wi  # times conj W
        pr[k, col] = er - oi
        pi[k, col] = ei + orr

    @kernel("F2 F2 i i i f F2 F4")
    def fft_store_k(zr, zi, row0, count, offset, norm, weight, out):
        """out[b, h, t, f] = p[t + offset] * norm * weight[b', t] for the rows row0 .. row0 + count, p the
        real sequence whose even samples are zr and odd ones zi; one thread per (t, r), r fastest."""
        idx = cuda.grid(1)
        if idx >= out.shape[2] * count:
            return
        t, r = idx // count, idx % count
        b, h, f = unravel3(row0 + r, out.shape[1], out.shape[3])
        n = t + offset
        value = zr[n // 2, r] if n % 2 == 0 else zi[n // 2, r]
        out[b, h, t, f] = value * norm * weight[b if weight.shape[0] > 1 else 0, t]

    return table


# ------------------------------------------------------------------------------ the emulation


def _complex_twiddle(twr: np.ndarray, twi: np.ndarray, t: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`device.functions`' ``twiddle`` on arrays of exponents."""
    t = np.asarray(t)
    low = t < half
    top = t >= 2 * half
    index = np.where(low, t, np.where(top, 0, t - half))
    sign = np.where(low | top, 1, -1).astype(twr.dtype)
    return sign * twr[index], sign * twi[index]


def emulate_load(x: np.ndarray, weight: np.ndarray, reverse: bool, row0: int, count: int, half: int,
                 chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``fft_load_k`` in NumPy: (zr, zi) of shape (M, chunk)."""
    batch, heads, length, features = x.shape
    rows = x.transpose(0, 1, 3, 2).reshape(batch * heads * features, length)[row0:row0 + count]
    bh = np.arange(row0, row0 + count) // features
    weights = weight[np.where(weight.shape[0] > 1, bh // heads, 0)]
    if reverse:
        rows, weights = rows[:, ::-1], weights[:, ::-1]
    values = np.zeros((chunk, 2 * half), dtype=x.dtype)
    values[:count, :length] = rows * weights
    return np.ascontiguousarray(values[:, 0::2].T), np.ascontiguousarray(values[:, 1::2].T)


def emulate_pass(xr: np.ndarray, xi: np.ndarray, twr: np.ndarray, twi: np.ndarray, stride: int, radix: int,
                 direction: int) -> tuple[np.ndarray, np.ndarray]:
    """``fft_pass_k`` in NumPy, the same operations in the same order: (yr, yi)."""
    half, columns = xr.shape
    span = half // radix
    butterflies = radix // 2
    sign = xr.dtype.type(direction)
    ar, ai = xr.reshape(radix, span, columns).copy(), xi.reshape(radix, span, columns).copy()  # [j, u, column]
    t = np.arange(butterflies)
    inner = 1
    while inner < radix:
        p = t // inner
        q = t - p * inner
        wr, wi = _complex_twiddle(twr, twi, 2 * p * inner * span, twr.shape[0])
        wr, wi = wr[:, None, None], sign * wi[:, None, None]
        a_r, a_i = ar[q + inner * p], ai[q + inner * p]
        b_r, b_i = ar[q + inner * p + butterflies], ai[q + inner * p + butterflies]
        d_r, d_i = a_r - b_r, a_i - b_i
        nr, ni = np.empty_like(ar), np.empty_like(ai)
        nr[q + 2 * inner * p], ni[q + 2 * inner * p] = a_r + b_r, a_i + b_i
        nr[q + inner * (2 * p + 1)], ni[q + inner * (2 * p + 1)] = d_r * wr - d_i * wi, d_r * wi + d_i * wr
        ar, ai = nr, ni
        inner *= 2
    u = np.arange(span)
    p = u // stride
    q = u - p * stride
    k = np.arange(radix)[:, None]
    wr, wi = _complex_twiddle(twr, twi, 2 * p[None, :] * k * stride, twr.shape[0])
    wr, wi = wr[..., None], sign * wi[..., None]
    yr, yi = np.empty_like(xr), np.empty_like(xi)
    target = q[None, :] + stride * (radix * p[None, :] + k)
    yr[target], yi[target] = ar * wr - ai * wi, ar * wi + ai * wr
    return yr, yi


def _emulate_spectrum(zr: np.ndarray, zi: np.ndarray, k: np.ndarray, twr: np.ndarray,
                      twi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = zr.shape[0]
    one_half = zr.dtype.type(0.5)
    ar, ai = zr[k % half], zi[k % half]
    cr, ci = zr[(half - k) % half], -zi[(half - k) % half]
    er, ei = one_half * (ar + cr), one_half * (ai + ci)
    orr, oi = one_half * (ai - ci), -one_half * (ar - cr)
    wr, wi = _complex_twiddle(twr, twi, k, half)
    wr, wi = wr[:, None], wi[:, None]
    return er + (wr * orr - wi * oi), ei + (wr * oi + wi * orr)


def emulate_split(xr: np.ndarray, xi: np.ndarray, yr: np.ndarray, yi: np.ndarray, twr: np.ndarray,
                  twi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fft_split_k`` in NumPy: (pr, pi)."""
    half = xr.shape[0]
    one_half = xr.dtype.type(0.5)
    k = np.arange(half)
    xr0, xi0 = _emulate_spectrum(xr, xi, k, twr, twi)
    yr0, yi0 = _emulate_spectrum(yr, yi, k, twr, twi)
    xr1, xi1 = _emulate_spectrum(xr, xi, half - k, twr, twi)
    yr1, yi1 = _emulate_spectrum(yr, yi, half - k, twr, twi)
    p0r, p0i = xr0 * yr0 - xi0 * yi0, xr0 * yi0 + xi0 * yr0
    p1r, p1i = xr1 * yr1 - xi1 * yi1, -(xr1 * yi1 + xi1 * yr1)
    er, ei = one_half * (p0r + p1r), one_half * (p0i + p1i)
    dr, di = one_half * (p0r - p1r), one_half * (p0i - p1i)
    wr, wi = _complex_twiddle(twr, twi, k, half)
    wr, wi = wr[:, None], wi[:, None]
    orr, oi = dr * wr + di * wi, di * wr - dr * wi
    return er - oi, ei + orr


def emulate_store(zr: np.ndarray, zi: np.ndarray, count: int, offset: int, length: int) -> np.ndarray:
    """The sequence ``fft_store_k`` reads, before its scaling: p[t + offset] for t < length, (count, length)."""
    p = np.empty((2 * zr.shape[0], zr.shape[1]), dtype=zr.dtype)
    p[0::2], p[1::2] = zr, zi
    return np.ascontiguousarray(p[offset:offset + length, :count].T)


def emulate_convolve(x: np.ndarray, x_weight: np.ndarray, x_reverse: bool, y: np.ndarray, y_weight: np.ndarray,
                     y_reverse: bool, offset: int, length: int, out_weight: np.ndarray, *,
                     max_radix: int | None = None, budget: int = FFT_BUDGET_BYTES) -> np.ndarray:
    """:func:`convolve` in NumPy, kernel by kernel in the dtype of x: out (B, H, length, F)."""
    batch, heads, _, features = x.shape
    dtype = x.dtype
    plan = fft_plan(x.shape[2] + y.shape[2] - 1, batch * heads * features, dtype.itemsize, max_radix, budget)
    twr, twi = twiddle_table(plan.size, dtype.name)
    norm = dtype.type(1.0 / plan.half)

    def transform(zr: np.ndarray, zi: np.ndarray, direction: int) -> tuple[np.ndarray, np.ndarray]:
        stride = 1
        for radix in plan.radices:
            zr, zi = emulate_pass(zr, zi, twr, twi, stride, radix, direction)
            stride *= radix
        return zr, zi

    rows = []
    for row0 in range(0, plan.rows, plan.chunk):
        count = min(plan.chunk, plan.rows - row0)
        sx = transform(*emulate_load(x, x_weight, x_reverse, row0, count, plan.half, plan.chunk), 1)
        sy = transform(*emulate_load(y, y_weight, y_reverse, row0, count, plan.half, plan.chunk), 1)
        rows.append(emulate_store(*transform(*emulate_split(*sx, *sy, twr, twi), -1), count, offset, length))
    values = np.concatenate(rows).reshape(batch, heads, features, length).transpose(0, 1, 3, 2) * norm
    return values * out_weight[:, None, :, None]
