"""The FSAT kernels of the Numba-CUDA backend, and the utility kernels every step uses.

:func:`build` returns, for a Numba float type, every kernel as a plain Python function together
with its signature spec (see :mod:`._kernels`, which gathers the builders and compiles them).
Shared-memory tiles are typed with the kernel's dtype, which is why the kernels are built per dtype.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from ._kernels import CHUNK, REDUCE, SLAB, KernelTable, registry


def build(dt: Any) -> KernelTable:
    """Every kernel for the float type ``dt``: name -> (python function, signature spec)."""
    ZERO = dt(0.0)
    ONE = dt(1.0)
    NEG_INF = dt(-math.inf)
    POS_INF = dt(math.inf)
    kernels, kernel = registry()

    # ------------------------------------------------------------------ utilities

    @kernel("F1 f")
    def fill_f1(x, value):
        idx = cuda.grid(1)
        if idx < x.shape[0]:
            x[idx] = value

    @kernel("I1 i")
    def fill_i1(x, value):
        idx = cuda.grid(1)
        if idx < x.shape[0]:
            x[idx] = value

    # NaN/Inf counters: grid-stride loops (the launch caps the grid), one atomic per thread at most.

    @kernel("F1 i I1")
    def count_bad_1(x, allow_neginf, counter):
        bad = 0
        for idx in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            value = x[idx]
            if value != value or value == POS_INF or (value == NEG_INF and allow_neginf == 0):
                bad += 1
        if bad:
            cuda.atomic.add(counter, 0, bad)

    @kernel("F2 i I1")
    def count_bad_2(x, allow_neginf, counter):
        n1 = x.shape[1]
        bad = 0
        for idx in range(cuda.grid(1), x.shape[0] * n1, cuda.gridsize(1)):
            value = x[idx // n1, idx % n1]
            if value != value or value == POS_INF or (value == NEG_INF and allow_neginf == 0):
                bad += 1
        if bad:
            cuda.atomic.add(counter, 0, bad)

    @kernel("F3 i I1")
    def count_bad_3(x, allow_neginf, counter):
        n1, n2 = x.shape[1], x.shape[2]
        bad = 0
        for idx in range(cuda.grid(1), x.shape[0] * n1 * n2, cuda.gridsize(1)):
            value = x[idx // (n1 * n2), (idx // n2) % n1, idx % n2]
            if value != value or value == POS_INF or (value == NEG_INF and allow_neginf == 0):
                bad += 1
        if bad:
            cuda.atomic.add(counter, 0, bad)

    @kernel("F4 i I1")
    def count_bad_4(x, allow_neginf, counter):
        n1, n2, n3 = x.shape[1], x.shape[2], x.shape[3]
        bad = 0
        for idx in range(cuda.grid(1), x.shape[0] * n1 * n2 * n3, cuda.gridsize(1)):
            value = x[idx // (n1 * n2 * n3), (idx // (n2 * n3)) % n1, (idx // n3) % n2, idx % n3]
            if value != value or value == POS_INF or (value == NEG_INF and allow_neginf == 0):
                bad += 1
        if bad:
            cuda.atomic.add(counter, 0, bad)

    @kernel("F5 i I1")
    def count_bad_5(x, allow_neginf, counter):
        n1, n2, n3, n4 = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
        bad = 0
        for idx in range(cuda.grid(1), x.shape[0] * n1 * n2 * n3 * n4, cuda.gridsize(1)):
            value = x[idx // (n1 * n2 * n3 * n4), (idx // (n2 * n3 * n4)) % n1, (idx // (n3 * n4)) % n2,
                      (idx // n4) % n3, idx % n4]
            if value != value or value == POS_INF or (value == NEG_INF and allow_neginf == 0):
                bad += 1
        if bad:
            cuda.atomic.add(counter, 0, bad)


    # ------------------------------------------------------------------ FSAT step 1: cross (FFT)

    @kernel("F2 I2")
    def pair_counts_k(valid, counts):
        """n[b, t] = #{i : valid[b, i] and valid[b, i + tau]}, tau = t - (L - 1); one thread per (b, t)."""
        idx = cuda.grid(1)
        rows, count = counts.shape
        length = valid.shape[1]
        if idx >= rows * count:
            return
        b = idx // count
        t = idx % count
        tau = t - (length - 1)
        lo = max(0, -tau)
        hi = min(length, length - tau)
        n = 0
        for i in range(lo, hi):
            if valid[b, i] != ZERO and valid[b, i + tau] != ZERO:
                n += 1
        counts[b, t] = n

    @kernel("I2 F2")
    def inverse_counts_k(counts, inverse):
        idx = cuda.grid(1)
        rows, count = counts.shape
        if idx < rows * count:
            n = counts[idx // count, idx % count]
            inverse[idx // count, idx % count] = ONE / dt(n) if n > 0 else ZERO

    @kernel("F4 F2 i F4 F2 i F2 F2")
    def pack_k(x, mx, rev_x, y, my, rev_y, re, im):
        """re[row, n] = x[.., n] * mx[.., n] (reversed if rev_x), im likewise from y; zero beyond each length.

        Two real sequences in one complex FFT; row = (b * H + h) * F + f. Threads run fastest along
        the feature axis, so the reads of x and y are coalesced.
        """
        idx = cuda.grid(1)
        batch, heads, len_x, features = x.shape
        len_y = y.shape[2]
        size = re.shape[1]
        if idx >= batch * heads * features * size:
            return
        f = idx % features
        rest = idx // features
        n = rest % size
        rest //= size
        h = rest % heads
        b = rest // heads
        xv = ZERO
        if n < len_x:
            src = len_x - 1 - n if rev_x else n
            xv = x[b, h, src, f] * mx[b if mx.shape[0] > 1 else 0, src]
        yv = ZERO
        if n < len_y:
            src = len_y - 1 - n if rev_y else n
            yv = y[b, h, src, f] * my[b if my.shape[0] > 1 else 0, src]
        row = (b * heads + h) * features + f
        re[row, n] = xv
        im[row, n] = yv

    @kernel("F2 F2 F2 F2 F1 F1 i f")
    def fft_stage_k(xr, xi, yr, yi, wr, wi, stride, sign):
        """One radix-2 Stockham stage (autosort, out of place) over every row; one thread per butterfly.

        With n = N / stride and m = n / 2: y[q + s(2p)] = a + b, y[q + s(2p+1)] = (a - b) W_N^(p s),
        a = x[q + s p], b = x[q + s (p + m)]; ``sign`` = -1 conjugates the twiddles (inverse FFT).
        """
        idx = cuda.grid(1)
        rows, size = xr.shape
        half = size // 2
        if idx >= rows * half:
            return
        row = idx // half
        t = idx % half
        p = t // stride
        q = t % stride
        m = half // stride
        ar = xr[row, q + stride * p]
        ai = xi[row, q + stride * p]
        br = xr[row, q + stride * (p + m)]
        bi = xi[row, q + stride * (p + m)]
        w_r = wr[p * stride]
        w_i = sign * wi[p * stride]
        yr[row, q + stride * 2 * p] = ar + br
        yi[row, q + stride * 2 * p] = ai + bi
        dr = ar - br
        di = ai - bi
        yr[row, q + stride * (2 * p + 1)] = dr * w_r - di * w_i
        yi[row, q + stride * (2 * p + 1)] = dr * w_i + di * w_r

    @kernel("F2 F2 F2 F2")
    def spectral_product_k(zr, zi, pr, pi):
        """P = X Y from Z = FFT(x + i y) of two real sequences: X Y = (Z_k^2 - conj(Z_{-k})^2) / (4i)."""
        idx = cuda.grid(1)
        rows, size = zr.shape
        if idx >= rows * size:
            return
        row = idx // size
        k = idx % size
        kk = (size - k) % size
        ar = zr[row, k]
        ai = zi[row, k]
        br = zr[row, kk]
        bi = -zi[row, kk]
        sr = (ar * ar - ai * ai) - (br * br - bi * bi)
        si = dt(2.0) * (ar * ai - br * bi)
        pr[row, k] = si * dt(0.25)
        pi[row, k] = -sr * dt(0.25)

    @kernel("F2 i f F2 F4")
    def unpack_k(re, offset, norm, scale, out):
        """out[b, h, t, f] = re[row, t + offset] * norm * scale[b or 0, t]."""
        idx = cuda.grid(1)
        batch, heads, count, features = out.shape
        if idx >= batch * heads * count * features:
            return
        f = idx % features
        rest = idx // features
        t = rest % count
        rest //= count
        h = rest % heads
        b = rest // heads
        row = (b * heads + h) * features + f
        out[b, h, t, f] = re[row, t + offset] * norm * scale[b if scale.shape[0] > 1 else 0, t]

    # ------------------------------------------------------------------ FSAT step 2: estimate, select

    @kernel("F4 F2 I2 f F3")
    def estimate_k(c, w, counts, rscale, s):
        idx = cuda.grid(1)
        batch, heads, count, features = c.shape
        if idx >= batch * heads * count:
            return
        t = idx % count
        h = (idx // count) % heads
        b = idx // (count * heads)
        if counts[b if counts.shape[0] > 1 else 0, t] == 0:
            s[b, h, t] = NEG_INF
            return
        acc = ZERO
        for f in range(features):
            acc += w[h, f] * c[b, h, t, f]
        s[b, h, t] = acc * rscale

    @kernel("F3 F2 I2 f F4")
    def estimate_vjp_dc_k(ds, w, counts, rscale, dc):
        idx = cuda.grid(1)
        batch, heads, count, features = dc.shape
        if idx >= batch * heads * count * features:
            return
        f = idx % features
        rest = idx // features
        t = rest % count
        rest //= count
        h = rest % heads
        b = rest // heads
        g = ds[b, h, t] if counts[b if counts.shape[0] > 1 else 0, t] > 0 else ZERO
        dc[b, h, t, f] = g * w[h, f] * rscale

    @kernel("F3 F4 I2 f F2")
    def estimate_vjp_dw_k(ds, c, counts, rscale, dw):
        """dw[h, f] = sum_{b, t} ds c / sqrt(Dc) over offsets with pairs; one thread per (h, f), coalesced in f."""
        idx = cuda.grid(1)
        batch, heads, count, features = c.shape
        if idx >= heads * features:
            return
        h = idx // features
        f = idx % features
        acc = ZERO
        for b in range(batch):
            bc = b if counts.shape[0] > 1 else 0
            for t in range(count):
                if counts[bc, t] > 0:
                    acc += ds[b, h, t] * c[b, h, t, f]
        dw[h, f] = acc * rscale

    @kernel("F3 F3 i i i I3")
    def select_rank_k(s, noise, has_noise, causal, wanted, chosen):
        """chosen[b, h, t] = 1 if offset t is selected: tau = 0, or a candidate ranked below ``wanted``.

        Rank by counting on the composite key (score descending, then |tau| ascending, then the
        negative offset first): one thread per (b, h, t), O(L) work each.
        """
        idx = cuda.grid(1)
        batch, heads, count = s.shape
        if idx >= batch * heads * count:
            return
        t = idx % count
        h = (idx // count) % heads
        b = idx // (count * heads)
        length = (count + 1) // 2
        tau = t - (length - 1)
        if tau == 0:
            chosen[b, h, t] = 1
            return
        if causal and tau > 0:
            chosen[b, h, t] = 0
            return
        key = s[b, h, t]
        if has_noise:
            key += noise[b, h, t]
        prio = 2 * abs(tau) - (1 if tau < 0 else 0)
        rank = 0
        for u in range(count):
            other = u - (length - 1)
            if other == 0 or (causal and other > 0):
                continue
            okey = s[b, h, u]
            if has_noise:
                okey += noise[b, h, u]
            oprio = 2 * abs(other) - (1 if other < 0 else 0)
            if okey > key or (okey == key and oprio < prio):
                rank += 1
        chosen[b, h, t] = 1 if rank < wanted else 0

    @kernel("I3 I3")
    def select_place_k(chosen, offsets):
        """offsets[b, h, position] = tau for every chosen tau, position = number of chosen offsets below it."""
        idx = cuda.grid(1)
        batch, heads, count = chosen.shape
        if idx >= batch * heads * count:
            return
        t = idx % count
        h = (idx // count) % heads
        b = idx // (count * heads)
        if chosen[b, h, t] == 0:
            return
        position = 0
        for u in range(t):
            position += chosen[b, h, u]
        offsets[b, h, position] = t - (count - 1) // 2

    @kernel("F3 I3 F3")
    def gather_bias_k(s, offsets, bias):
        idx = cuda.grid(1)
        batch, heads, top = offsets.shape
        if idx >= batch * heads * top:
            return
        m = idx % top
        h = (idx // top) % heads
        b = idx // (top * heads)
        length = (s.shape[2] + 1) // 2
        bias[b, h, m] = s[b, h, offsets[b, h, m] + length - 1]

    @kernel("F3 I3 F3")
    def scatter_ds_k(dbias, offsets, ds):
        idx = cuda.grid(1)
        batch, heads, top = offsets.shape
        if idx >= batch * heads * top:
            return
        m = idx % top
        h = (idx // top) % heads
        b = idx // (top * heads)
        length = (ds.shape[2] + 1) // 2
        ds[b, h, offsets[b, h, m] + length - 1] = dbias[b, h, m]

    # ------------------------------------------------------------------ FSAT step 3: sparse attention

    @kernel("F4 F4 F4 I3 F3 i i F2 f F4 F3")
    def sparse_fwd_k(q, k, v, offsets, bias, has_bias, causal, valid, scale, out, lse):
        """One block per (query tile, b * H + h), one thread per query, online softmax over the K offsets.

        For offset tau the keys of the tile's queries i0 .. i0 + T - 1 are the contiguous rows
        i0 + tau .. of k (and v): each is staged in shared memory in feature chunks by coalesced
        loads, so no L x K x D intermediate exists; the output row is the running accumulator.
        """
        tile = cuda.shared.array(SLAB, dt)
        batch, heads, length, dim = q.shape
        dim_v = v.shape[3]
        top = offsets.shape[2]
        bh = cuda.blockIdx.y
        b = bh // heads
        h = bh % heads
        width = cuda.blockDim.x
        tid = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * width
        i = i0 + tid
        active = i < length
        bv = b if valid.shape[0] > 1 else 0
        run_max = NEG_INF
        run_sum = ZERO
        if active:
            for e in range(dim_v):
                out[b, h, i, e] = ZERO
        for m in range(top):
            tau = offsets[b, h, m]
            shift = bias[b, h, m] if has_bias else ZERO
            j = i + tau
            ok = active and shift > NEG_INF and j >= 0 and j < length and not (causal and tau > 0) \
                and valid[bv, i] != ZERO and valid[bv, j] != ZERO
            z = ZERO
            for d0 in range(0, dim, CHUNK):
                w = min(CHUNK, dim - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    jj = i0 + tau + r
                    if jj >= 0 and jj < length:
                        tile[r * CHUNK + e % w] = k[b, h, jj, d0 + e % w]
                cuda.syncthreads()
                if ok:
                    for c in range(w):
                        z += q[b, h, i, d0 + c] * tile[tid * CHUNK + c]
            new_max = run_max
            correction = ONE
            p = ZERO
            if ok:
                z = z * scale + shift
                new_max = max(run_max, z)
                correction = math.exp(run_max - new_max)
                p = math.exp(z - new_max)
                run_sum = run_sum * correction + p
                run_max = new_max
            for d0 in range(0, dim_v, CHUNK):
                w = min(CHUNK, dim_v - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    jj = i0 + tau + r
                    if jj >= 0 and jj < length:
                        tile[r * CHUNK + e % w] = v[b, h, jj, d0 + e % w]
                cuda.syncthreads()
                if ok:
                    for c in range(w):
                        out[b, h, i, d0 + c] = out[b, h, i, d0 + c] * correction + p * tile[tid * CHUNK + c]
        if active:
            if run_sum > ZERO:
                inv = ONE / run_sum
                for e in range(dim_v):
                    out[b, h, i, e] *= inv
                lse[b, h, i] = run_max + math.log(run_sum)
            else:
                lse[b, h, i] = NEG_INF

    @kernel("F4 F4 F4 I3 F3 i i F2 f F4 F3 F4 F3 i F4 F4 F4")
    def sparse_bwd_q_k(q, k, v, offsets, bias, has_bias, causal, valid, scale, out, lse, dout, dlse, has_dlse,
                       probs, dz, dq):
        """Per query (same tiling as the forward): p, dz = p (dout.v_j - dout.out + dlse) and dq.

        Writes p and dz to (B, H, L, K) arrays for the key-side kernel and the bias reduction.
        """
        tile = cuda.shared.array(SLAB, dt)
        batch, heads, length, dim = q.shape
        dim_v = v.shape[3]
        top = offsets.shape[2]
        bh = cuda.blockIdx.y
        b = bh // heads
        h = bh % heads
        width = cuda.blockDim.x
        tid = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * width
        i = i0 + tid
        active = i < length
        bv = b if valid.shape[0] > 1 else 0
        row_lse = NEG_INF
        row_term = ZERO
        if active:
            row_lse = lse[b, h, i]
            for e in range(dim_v):
                row_term += dout[b, h, i, e] * out[b, h, i, e]
            if has_dlse and row_lse > NEG_INF:
                row_term -= dlse[b, h, i]
            for e in range(dim):
                dq[b, h, i, e] = ZERO
        live = active and row_lse > NEG_INF
        for m in range(top):
            tau = offsets[b, h, m]
            shift = bias[b, h, m] if has_bias else ZERO
            j = i + tau
            ok = live and shift > NEG_INF and j >= 0 and j < length and not (causal and tau > 0) \
                and valid[bv, i] != ZERO and valid[bv, j] != ZERO
            z = ZERO
            for d0 in range(0, dim, CHUNK):
                w = min(CHUNK, dim - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    jj = i0 + tau + r
                    if jj >= 0 and jj < length:
                        tile[r * CHUNK + e % w] = k[b, h, jj, d0 + e % w]
                cuda.syncthreads()
                if ok:
                    for c in range(w):
                        z += q[b, h, i, d0 + c] * tile[tid * CHUNK + c]
            dp = ZERO
            for d0 in range(0, dim_v, CHUNK):
                w = min(CHUNK, dim_v - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    jj = i0 + tau + r
                    if jj >= 0 and jj < length:
                        tile[r * CHUNK + e % w] = v[b, h, jj, d0 + e % w]
                cuda.syncthreads()
                if ok:
                    for c in range(w):
                        dp += dout[b, h, i, d0 + c] * tile[tid * CHUNK + c]
            p = ZERO
            g = ZERO
            if ok:
                p = math.exp(z * scale + shift - row_lse)
                g = p * (dp - row_term)
            if active:
                probs[b, h, i, m] = p
                dz[b, h, i, m] = g
            for d0 in range(0, dim, CHUNK):
                w = min(CHUNK, dim - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    jj = i0 + tau + r
                    if jj >= 0 and jj < length:
                        tile[r * CHUNK + e % w] = k[b, h, jj, d0 + e % w]
                cuda.syncthreads()
                if ok:
                    for c in range(w):
                        dq[b, h, i, d0 + c] += scale * g * tile[tid * CHUNK + c]

    @kernel("F4 F4 I3 F4 F4 f F4 F4")
    def sparse_bwd_kv_k(q, dout, offsets, probs, dz, scale, dk, dv):
        """Per key j (one block per key tile and (b, h)): dk_j = s sum_m dz[j - tau_m, m] q_{j - tau_m},
        dv_j = sum_m p[j - tau_m, m] dout_{j - tau_m}; a gather (each key has one query per offset),
        the query rows staged in shared memory like the forward's key rows."""
        tile = cuda.shared.array(SLAB, dt)
        batch, heads, length, dim = q.shape
        dim_v = dout.shape[3]
        top = offsets.shape[2]
        bh = cuda.blockIdx.y
        b = bh // heads
        h = bh % heads
        width = cuda.blockDim.x
        tid = cuda.threadIdx.x
        j0 = cuda.blockIdx.x * width
        j = j0 + tid
        active = j < length
        if active:
            for e in range(dim):
                dk[b, h, j, e] = ZERO
            for e in range(dim_v):
                dv[b, h, j, e] = ZERO
        for m in range(top):
            tau = offsets[b, h, m]
            i = j - tau
            ok = active and i >= 0 and i < length
            g = ZERO
            p = ZERO
            if ok:
                g = dz[b, h, i, m] * scale
                p = probs[b, h, i, m]
            for d0 in range(0, dim, CHUNK):
                w = min(CHUNK, dim - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    ii = j0 - tau + r
                    if ii >= 0 and ii < length:
                        tile[r * CHUNK + e % w] = q[b, h, ii, d0 + e % w]
                cuda.syncthreads()
                if ok and g != ZERO:
                    for c in range(w):
                        dk[b, h, j, d0 + c] += g * tile[tid * CHUNK + c]
            for d0 in range(0, dim_v, CHUNK):
                w = min(CHUNK, dim_v - d0)
                cuda.syncthreads()
                for e in range(tid, width * w, width):
                    r = e // w
                    ii = j0 - tau + r
                    if ii >= 0 and ii < length:
                        tile[r * CHUNK + e % w] = dout[b, h, ii, d0 + e % w]
                cuda.syncthreads()
                if ok and p != ZERO:
                    for c in range(w):
                        dv[b, h, j, d0 + c] += p * tile[tid * CHUNK + c]

    @kernel("F4 F3")
    def sum_over_length_k(x, total):
        """total[b, h, m] = sum_i x[b, h, i, m]: one block per (b * H + h, m), shared-memory tree reduction.

        The block size must be a power of two no larger than REDUCE.
        """
        partial = cuda.shared.array(REDUCE, dt)
        batch, heads, length, top = x.shape
        bh = cuda.blockIdx.x
        m = cuda.blockIdx.y
        b = bh // heads
        h = bh % heads
        tid = cuda.threadIdx.x
        width = cuda.blockDim.x
        acc = ZERO
        for i in range(tid, length, width):
            acc += x[b, h, i, m]
        partial[tid] = acc
        step = width // 2
        while step > 0:
            cuda.syncthreads()
            if tid < step:
                partial[tid] += partial[tid + step]
            step //= 2
        cuda.syncthreads()
        if tid == 0:
            total[b, h, m] = partial[0]

    return kernels
