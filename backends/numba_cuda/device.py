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
LIST_ROWS = 32  # rows of a listed-row slab (and the side of its tile of weights: [row * LIST_ROWS + thread])
LIST_CHUNK = 32  # features per listed-row slab load


@cuda.jit(device=True, inline=True)
def unravel3(idx, n1, n2):
    """(i0, i1, i2) of the flat index ``idx`` into a C-ordered (n0, n1, n2) array."""
    i2 = idx % n2
    rest = idx // n2
    return rest // n1, rest % n1, i2


@cuda.jit(device=True, inline=True)
def unravel4(idx, n1, n2, n3):
    """(i0, i1, i2, i3) of the flat index ``idx`` into a C-ordered (n0, n1, n2, n3) array."""
    i0, i1, i2 = unravel3(idx // n3, n1, n2)
    return i0, i1, i2, idx % n3


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
    def stage_rows(ta, tb, stride, x, x_row0, y, y_row0, b, h, rows, col0, width, both):
        """ta[r * stride + c] = x[b, h, x_row0 + r, col0 + c] for r < rows, c < width (0 where the row lies
        outside [0, L)), and with ``both`` tb likewise from y's rows y_row0 ..: consecutive threads load
        consecutive features of a row (coalesced) and store them to consecutive addresses. A barrier
        before (earlier readers of the tiles) and after (the tiles are complete). Every thread of the
        block must call it."""
        length = x.shape[2]
        threads = cuda.blockDim.x * cuda.blockDim.y
        cuda.syncthreads()
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, rows * width, threads):
            r = e // width
            c = e - r * width
            row = x_row0 + r
            ta[r * stride + c] = x[b, h, row, col0 + c] if 0 <= row < length else ZERO
            if both:
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
    def nan_max(a, b):
        """The larger of a and b, NaN when either is NaN. (Python's max, and Numba's, return their first
        argument when the second is NaN: a logit that overflowed to NaN would drop out of a running maximum.)"""
        return b if b > a or b != b else a

    @cuda.jit(device=True, inline=True)
    def rescale(run_max, new_max):
        """(max(run_max, new_max), exp(run_max - that)): the online softmax's new running maximum and the
        factor its running sum and output take (1 when both are -inf: nothing to rescale; NaN once either
        is NaN, so that an overflowed logit reaches the running sum and lse)."""
        top = nan_max(run_max, new_max)
        if top == NEG_INF:
            return top, dt(1.0)
        return top, math.exp(run_max - top)

    @cuda.jit(device=True, inline=True)
    def listed_pass(weights, first, count, slab, table, rows, staged, x, b, h, row, live, decay, scale, mode):
        """One pass over the ``staged`` listed rows of ``table`` (B, H, ·, F), LIST_CHUNK features at a time
        (:func:`stage_listed_rows`), for the calling thread t (threadIdx.x) and its rows r < count of the
        tile of weights ([(first + r) * LIST_ROWS + t]):

        - mode 0: weights[r] += x[b, h, row] . table[rows[first + r]] (logits, or dp);
        - mode 1: x[b, h, row] = decay * x[b, h, row] + scale * sum_r weights[r] table[rows[first + r]];
        - mode 2: that sum, times scale, added atomically (a row several threads add to).

        Only threads with ``live`` compute. Every thread of the block must call it."""
        t = cuda.threadIdx.x
        features = table.shape[3]
        for d0 in range(0, features, LIST_CHUNK):
            stage_listed_rows(slab, LIST_CHUNK, table, rows, staged, d0)
            if live:
                for d in range(min(LIST_CHUNK, features - d0)):
                    if mode == 0:
                        f = x[b, h, row, d0 + d]
                        for r in range(count):
                            weights[(first + r) * LIST_ROWS + t] += f * slab[(first + r) * LIST_CHUNK + d]
                    else:
                        acc = ZERO
                        for r in range(count):
                            acc += weights[(first + r) * LIST_ROWS + t] * slab[(first + r) * LIST_CHUNK + d]
                        if mode == 1:
                            x[b, h, row, d0 + d] = decay * x[b, h, row, d0 + d] + scale * acc
                        elif acc != ZERO:
                            cuda.atomic.add(x, (b, h, row, d0 + d), scale * acc)

    @cuda.jit(device=True, inline=True)
    def listed_products(weights, first, count, slab, table, rows, staged, x, b, h, row, live):
        """:func:`listed_pass` mode 0: weights += x[b, h, row] . the listed rows of table."""
        listed_pass(weights, first, count, slab, table, rows, staged, x, b, h, row, live, ZERO, ZERO, 0)

    @cuda.jit(device=True, inline=True)
    def listed_accumulate(target, b, h, row, weights, first, count, slab, table, rows, staged, decay, scale, live,
                          atomic):
        """:func:`listed_pass` mode 1 (mode 2 with ``atomic``): target[b, h, row] = decay target + scale sum."""
        listed_pass(weights, first, count, slab, table, rows, staged, target, b, h, row, live, decay, scale,
                    2 if atomic else 1)

    @cuda.jit(device=True, inline=True)
    def softmax_tile(weights, first, count, tile_max, run_max, run_sum):
        """The online softmax over one tile of logits weights[(first + r) * LIST_ROWS + threadIdx.x] (r < count,
        their maximum ``tile_max``): the logits become exp(z - new maximum); returns (live, the factor the
        running output takes, the new running maximum and sum). Nothing changes when every logit is -inf
        (no key); a NaN ``tile_max`` (:func:`nan_max` of an overflowed logit) makes the sum NaN."""
        t = cuda.threadIdx.x
        if tile_max == NEG_INF:
            return False, dt(1.0), run_max, run_sum
        top, factor = rescale(run_max, tile_max)
        total = ZERO
        for r in range(count):
            p = math.exp(weights[(first + r) * LIST_ROWS + t] - top)
            weights[(first + r) * LIST_ROWS + t] = p
            total += p
        return True, factor, top, run_sum * factor + total

    @cuda.jit(device=True, inline=True)
    def clear_row(x, b, h, row, active):
        if active:
            for d in range(x.shape[3]):
                x[b, h, row, d] = ZERO

    @cuda.jit(device=True, inline=True)
    def finish_row(out, lse, b, h, row, run_max, run_sum, active):
        """out[b, h, row] /= the running sum, lse[b, h, row] = its log-sum-exp (-inf, out left 0, with none).

        The sum is 0 only without a counted key (the key at the running maximum adds exp(0) = 1); NaN, from
        a logit that overflowed to +inf or NaN, goes on into out and lse for the caller's overflow check
        (a test ``run_sum > 0`` would read it as "no key": lse -inf, which that check allows)."""
        if active:
            if run_sum != ZERO:
                inverse = dt(1.0) / run_sum
                for d in range(out.shape[3]):
                    out[b, h, row, d] *= inverse
                lse[b, h, row] = run_max + math.log(run_sum)
            else:
                lse[b, h, row] = NEG_INF

    @cuda.jit(device=True, inline=True)
    def row_dot(x, y, b, h, row):
        """x[b, h, row] . y[b, h, row] (one thread)."""
        acc = ZERO
        for d in range(x.shape[3]):
            acc += x[b, h, row, d] * y[b, h, row, d]
        return acc

    @cuda.jit(device=True, inline=True)
    def stage_block(tile, x, b, h, row0, rows, col0, cols):
        """tile[r * GEMM_STRIDE + c] = x[b, h, row0 + r, col0 + c] for r < rows, c < cols (0 outside x):
        consecutive threads on consecutive c (coalesced). No barrier: the caller's."""
        threads = cuda.blockDim.x * cuda.blockDim.y
        for e in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, rows * cols, threads):
            r = e // cols
            c = e - r * cols
            inside = row0 + r < x.shape[2] and col0 + c < x.shape[3]
            tile[r * GEMM_STRIDE + c] = x[b, h, row0 + r, col0 + c] if inside else ZERO

    @cuda.jit(device=True, inline=True)
    def gemm(a, ab, a_row0, a_col0, a_trans, y, yb, y_row0, y_col0, y_trans, h, depth, sa, sy):
        """sum over k < depth of A[ty, k] Y[k, tx] for the calling thread (tx, ty): A[i, k] = a[ab, h, a_row0 + i,
        a_col0 + k] (a[ab, h, a_row0 + k, a_col0 + i] when ``a_trans``), Y[k, j] = y[yb, h, y_row0 + k, y_col0 + j]
        (y[yb, h, y_row0 + j, y_col0 + k] when ``y_trans``): both operands staged GEMM deep at a time in
        shared memory (row stride GEMM + 1: conflict-free). Every thread of the block must call it."""
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        acc = ZERO
        for k0 in range(0, depth, GEMM):
            w = min(GEMM, depth - k0)
            cuda.syncthreads()
            if a_trans:
                stage_block(sa, a, ab, h, a_row0 + k0, w, a_col0, cuda.blockDim.y)
            else:
                stage_block(sa, a, ab, h, a_row0, cuda.blockDim.y, a_col0 + k0, w)
            if y_trans:
                stage_block(sy, y, yb, h, y_row0, cuda.blockDim.x, y_col0 + k0, w)
            else:
                stage_block(sy, y, yb, h, y_row0 + k0, w, y_col0, cuda.blockDim.x)
            cuda.syncthreads()
            for k in range(w):
                acc += (sa[k * GEMM_STRIDE + ty] if a_trans else sa[ty * GEMM_STRIDE + k]) * \
                    (sy[tx * GEMM_STRIDE + k] if y_trans else sy[k * GEMM_STRIDE + tx])
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
                           stage_listed_rows=stage_listed_rows, gemm=gemm,
                           listed_products=listed_products, listed_accumulate=listed_accumulate,
                           softmax_tile=softmax_tile, clear_row=clear_row, finish_row=finish_row, row_dot=row_dot,
                           lane_dot=lane_dot, lane_axpy=lane_axpy, nan_max=nan_max, rescale=rescale,
                           padded_stride=padded_stride,
                           twiddle=twiddle)
