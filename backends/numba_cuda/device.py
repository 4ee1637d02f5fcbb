"""The device functions every kernel of the Numba-CUDA backend shares: tile staging, lane dot products,
the online softmax's rescaling, tree reductions and block scans, order keys, FFT twiddles.

:func:`functions` builds them for a Numba float type (their constants are typed with it) and the
kernel builders take what they call from it. They are inline device functions
(``inline=True``): a non-inlined ``cuda.jit(device=True)`` function makes ``compile_ptx``
initialise the CUDA driver, an inlined one does not. Warp shuffles are avoided because the CUDA
simulator does not provide them: reductions go through shared memory.

**Shared-memory layouts.** A staged tile holds ``rows`` rows of up to ``width`` features at a row
stride from :func:`padded_stride`: a thread (row r, lane g) of a block whose ``lanes`` lanes share
a row reads features g, g + lanes, ..., so a warp reads ``32 / lanes`` rows at once; a stride
congruent to ``lanes`` modulo ``2 * lanes`` puts those reads in 32 different banks (for 8-byte
elements, in 16 different bank pairs per half-warp): conflict-free.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

from numba import cuda, float64, int64

GEMM = 16  # side of the output tiles and depth of the staged operand tiles of the similarity products
GEMM_STRIDE = GEMM + 1  # row stride of a staged tile in shared memory (conflict-free column reads)
GEMM_SLAB = GEMM * GEMM_STRIDE  # a staged tile (shared-array sizes must be literal constants)
GEMM_SQUARE = GEMM * GEMM  # an output tile


def padded_stride(width: int, lanes: int) -> int:
    """The smallest row stride >= ``width`` congruent to ``lanes`` modulo ``2 * lanes`` (``lanes`` a
    power of two): the conflict-free stride of a tile read by ``lanes`` lanes per row."""
    return width + (lanes - width) % (2 * lanes)


@functools.cache
def functions(dt: Any) -> SimpleNamespace:
    """The shared device functions for the float type ``dt``."""
    ZERO = dt(0.0)
    NEG_INF = dt(-math.inf)
    wide = dt == float64
    # The IEEE layout of ``dt``, for the order keys: bits of the stored mantissa, the exponent bias
    # as frexp counts it (x = m 2^e, m in [0.5, 1), biased exponent e + EXP_BIAS), the smallest e of
    # a normal number, 2^(MANT_BITS + 1) to turn m into an integer, and the bits of infinity.
    MANT_BITS = 52 if wide else 23
    EXP_BIAS = 1022 if wide else 126
    MIN_NORMAL_EXP = -1021 if wide else -125
    MANT_SCALE = 1 << MANT_BITS
    M_TO_INT = dt(2.0 ** (MANT_BITS + 1))
    INF_BITS = (2 * EXP_BIAS + 3) * MANT_SCALE
    # A subnormal |x| is k 2^-(1074 | 149): k = |x| 2^1074 (2^149), in two exact steps that stay in range.
    SUB_A = dt(2.0 ** (537 if wide else 75))
    SUB_B = dt(2.0 ** (537 if wide else 74))
    POS_INF = dt(math.inf)

    @cuda.jit(device=True, inline=True)
    def tree_sum(buf, lane, lanes, stride, base, value):
        """Sum of ``value`` over ``lanes`` threads (a power of two) whose slots are buf[base + lane * stride].

        Returns the total to each of them. Every thread of the block must call it (barriers inside,
        none with one lane: ``lanes`` is a block dimension, so every thread takes the same branch).
        """
        if lanes == 1:
            return value
        buf[base + lane * stride] = value
        step = lanes // 2
        while step > 0:
            cuda.syncthreads()
            if lane < step:
                buf[base + lane * stride] += buf[base + (lane + step) * stride]
            step //= 2
        cuda.syncthreads()
        total = buf[base]
        cuda.syncthreads()  # the buffer may be refilled right after
        return total

    @cuda.jit(device=True, inline=True)
    def block_scan(buf, value):
        """(inclusive prefix sum of ``value`` over threadIdx.x, block total) for a 1-D block; ``buf``
        holds 2 * blockDim.x entries. Hillis-Steele, ping-ponging between the two halves of ``buf`` so
        that each step needs one barrier. Every thread of the block must call it."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        src = 0
        buf[tid] = value
        step = 1
        while step < threads:
            cuda.syncthreads()
            dst = threads - src
            buf[dst + tid] = buf[src + tid] + (buf[src + tid - step] if tid >= step else 0)
            src = dst
            step *= 2
        cuda.syncthreads()
        inclusive = buf[src + tid]
        total = buf[src + threads - 1]
        cuda.syncthreads()  # the buffer may be refilled right after
        return inclusive, total

    @cuda.jit(device=True, inline=True)
    def order_key(x):
        """An int64 whose order is the order of the float ``x`` (-0 and +0 equal, ±inf beyond every
        finite value): its IEEE magnitude bits, negated for negative x. Built from frexp, exactly,
        for normal and subnormal x (a bit cast is not available in both the simulator and PTX)."""
        if x == ZERO:
            return int64(0)
        magnitude = abs(x)
        if magnitude == POS_INF:
            bits = int64(INF_BITS)
        else:
            m, e = math.frexp(magnitude)
            if e >= MIN_NORMAL_EXP:
                bits = int64(e + EXP_BIAS) * MANT_SCALE + int64(m * M_TO_INT) - MANT_SCALE
            else:
                bits = int64(magnitude * SUB_A * SUB_B)
        return bits if x > ZERO else -bits

    @cuda.jit(device=True, inline=True)
    def stage_rows(tile, stride, x, b, h, row0, rows, col0, width):
        """tile[r * stride + c] = x[b, h, row0 + r, col0 + c] for r < rows, c < width (0 where row0 + r
        lies outside [0, L)): consecutive threads load consecutive features of a row (coalesced) and
        store them to consecutive addresses. A barrier before (earlier readers of the tile) and after
        (the tile is complete). Every thread of the block must call it."""
        length = x.shape[2]
        threads = cuda.blockDim.x * cuda.blockDim.y
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, rows * width, threads):
            r = e // width
            c = e - r * width
            row = row0 + r
            tile[r * stride + c] = x[b, h, row, col0 + c] if 0 <= row < length else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def stage_pair(ta, tb, stride, x, x_row0, y, y_row0, b, h, rows, col0, width):
        """:func:`stage_rows` of two tiles at once (one pair of barriers): ta from x's rows x_row0 .., tb from
        y's rows y_row0 .., the same columns."""
        length = x.shape[2]
        threads = cuda.blockDim.x * cuda.blockDim.y
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, rows * width, threads):
            r = e // width
            c = e - r * width
            row = x_row0 + r
            ta[r * stride + c] = x[b, h, row, col0 + c] if 0 <= row < length else ZERO
            row = y_row0 + r
            tb[r * stride + c] = y[b, h, row, col0 + c] if 0 <= row < length else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def stage_listed_rows(slab, stride, x, rows, count, d0):
        """slab[r * stride + c] = x[b, h, t, d0 + c] for r < count, c < w = min(stride, F - d0), where
        rows[r] = (b * H + h) * L + t is a flat row of x (B, H, L, F) (zeros where rows[r] < 0); the rows
        may belong to different (b, h). Barriers as :func:`stage_rows`."""
        heads, length = x.shape[1], x.shape[2]
        width = min(stride, x.shape[3] - d0)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, count * width,
                       cuda.blockDim.x * cuda.blockDim.y):
            r = e // width
            n = rows[r]
            slab[r * stride + e % width] = x[n // (heads * length), (n // length) % heads, n % length,
                                             d0 + e % width] if n >= 0 else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def stage_slots(slab, stride, x, cells, count, w0, d0):
        """slab[r * stride + c] = x[b, h, c, w0 + r % count, d0 + c] for r < blockDim.y * count: the slot
        rows w0 .. w0 + count of x (B, H, C, W, F) for each group's cluster (b * H + h) * C + c =
        cells[r // count] (zeros where it is -1). Barriers as :func:`stage_rows`."""
        heads, clusters = x.shape[1], x.shape[2]
        width = min(stride, x.shape[4] - d0)
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockDim.y * count * width,
                       cuda.blockDim.x * cuda.blockDim.y):
            r = e // width
            n = cells[r // count]
            slab[r * stride + e % width] = x[n // (heads * clusters), (n // clusters) % heads, n % clusters,
                                             w0 + r % count, d0 + e % width] if n >= 0 else ZERO
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def tile_dot(x, centroids, b, h, t0, c0, xs, ms):
        """x[b, h, t0 + ty] . centroids[h, c0 + tx] for the calling thread (0 outside the arrays).

        The block's blockDim.y token rows and blockDim.x centroid rows are staged GEMM features at a
        time, consecutive threads loading consecutive features. Every thread of the block must call it.
        """
        length, dim = x.shape[2], x.shape[3]
        clusters = centroids.shape[1]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        cols, rows = cuda.blockDim.x, cuda.blockDim.y
        tid = ty * cols + tx
        threads = cols * rows
        acc = ZERO
        for d0 in range(0, dim, GEMM):
            w = min(GEMM, dim - d0)
            cuda.syncthreads()
            for e in range(tid, rows * w, threads):
                t = t0 + e // w
                xs[(e // w) * GEMM_STRIDE + e % w] = x[b, h, t, d0 + e % w] if t < length else ZERO
            for e in range(tid, cols * w, threads):
                c = c0 + e // w
                ms[(e // w) * GEMM_STRIDE + e % w] = centroids[h, c, d0 + e % w] if c < clusters else ZERO
            cuda.syncthreads()
            for j in range(w):
                acc += xs[ty * GEMM_STRIDE + j] * ms[tx * GEMM_STRIDE + j]
        return acc

    @cuda.jit(device=True, inline=True)
    def lane_dot(a, row_a, b, row_b, width, lane, lanes):
        """This lane's share of a[row_a + d] . b[row_b + d] over d < width: d = lane, lane + lanes, ..."""
        acc = ZERO
        for d in range(lane, width, lanes):
            acc += a[row_a + d] * b[row_b + d]
        return acc

    @cuda.jit(device=True, inline=True)
    def lane_axpy(acc, row_acc, scale, x, weight, row_x, width, lane, lanes):
        """acc[row_acc + d] = scale * acc[row_acc + d] + weight * x[row_x + d] for this lane's d < width."""
        for d in range(lane, width, lanes):
            acc[row_acc + d] = scale * acc[row_acc + d] + weight * x[row_x + d]

    @cuda.jit(device=True, inline=True)
    def rescale(run_max, new_max):
        """(max(run_max, new_max), exp(run_max - that)): the online softmax's new running maximum and the
        factor its running sum and output take (1 when neither is finite: nothing to rescale)."""
        top = max(run_max, new_max)
        if top == NEG_INF:
            return top, dt(1.0)
        return top, math.exp(run_max - top)

    @cuda.jit(device=True, inline=True)
    def padded_stride(width, lanes):
        """:func:`padded_stride` in a kernel."""
        return width + (lanes - width) % (2 * lanes)

    @cuda.jit(device=True, inline=True)
    def twiddle(twr, twi, t, half):
        """W_N^t = exp(-2 pi i t / N) for t in [0, N] from the table of t < N / 2 = ``half`` (W^(t + N/2) = -W^t)."""
        if t < half:
            return twr[t], twi[t]
        if t < 2 * half:
            return -twr[t - half], -twi[t - half]
        return twr[0], twi[0]

    return SimpleNamespace(tree_sum=tree_sum, block_scan=block_scan, order_key=order_key, stage_rows=stage_rows,
                           stage_pair=stage_pair,
                           stage_listed_rows=stage_listed_rows, stage_slots=stage_slots, tile_dot=tile_dot,
                           lane_dot=lane_dot, lane_axpy=lane_axpy, rescale=rescale, padded_stride=padded_stride,
                           twiddle=twiddle)
