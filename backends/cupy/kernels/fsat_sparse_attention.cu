// FSAT step 3 (spec/fsat.md): attention restricted to the selected diagonals, forward and backward,
// as fused kernels for the refattn CuPy backend (backends/cupy/fsat.py launches them).
//
// For query i and selected offset tau_m (m = 0 .. K-1), with key j = i + tau_m:
//
//     z_{i,m} = q_i . k_j * scale + bias_m,   p_{i,m} = softmax_m(z_{i,m}),   out_i = sum_m p_{i,m} v_j
//
// over the *valid* pairs only: 0 <= j < L, tau_m <= 0 when causal, neither i nor j padding, and
// bias_m > -inf. A row with no valid pair outputs zeros and lse = -inf (exactly as the reference).
//
// Layout: every array is C-contiguous. q, k (BH, L, D); v, out, dout (BH, L, Dv); offsets, bias
// (BH, K); mask (B, L) as bytes (1 = padding); lse, delta (BH, L) and dz (BH, K, L) in the
// accumulation type. BH = B * H and the batch of row bh is bh / H.
//
// Work decomposition: one warp per (b, h, row): row = query (forward, dq) or key (dk, dv). A block
// holds WARPS warps = WARPS consecutive rows of one (b, h) (a "tile"); blockIdx.x enumerates
// (bh, tile) and blockIdx.y the column chunk: each warp keeps CHUNK = 32 * VPL output columns in
// registers (VPL per lane), so a row with more than CHUNK output columns is covered by several
// blocks that each recompute the (cheap, K-long) logits. Nothing of size L x K x D is stored; the
// K offsets are visited once per chunk with an online (running-max) softmax, accumulated in Acc:
// double for double inputs, float for float and half inputs.
//
// Control flow inside a warp depends only on (row, m), never on the lane, so every __shfl_xor_sync
// runs with the full warp. Half inputs are stored as unsigned short (IEEE binary16 bits) and
// converted with the PTX cvt instructions, so this file needs no header (in the CPU emulation of
// backends/cupy/emulation, which defines REFATTN_CUDA_EMULATION, with g++'s _Float16).

#define REFATTN_VPL 4
#define REFATTN_CHUNK (32 * REFATTN_VPL)
#define REFATTN_FULL_MASK 0xffffffffu

typedef unsigned short refattn_half;  // IEEE binary16 storage

template <typename T> struct Traits;

template <> struct Traits<double> {
    typedef double Acc;
    static __device__ __forceinline__ double load(double x) { return x; }
    static __device__ __forceinline__ double store(double x) { return x; }
};

template <> struct Traits<float> {
    typedef float Acc;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

template <> struct Traits<refattn_half> {
    typedef float Acc;
#ifdef REFATTN_CUDA_EMULATION  // CUDA C emulated on the CPU (backends/cupy/emulation): g++'s _Float16
    static float load(refattn_half h) { return float(std::bit_cast<_Float16>(h)); }
    static refattn_half store(float f) { return std::bit_cast<refattn_half>(_Float16(f)); }
#else
    static __device__ __forceinline__ float load(refattn_half h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ refattn_half store(float f) {
        refattn_half h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
#endif
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000ULL);
}

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
    for (int width = 16; width > 0; width >>= 1) x += __shfl_xor_sync(REFATTN_FULL_MASK, x, width);
    return x;
}

// Dot product of two rows of n elements, reduced over the warp (every lane gets the sum).
template <typename T> __device__ __forceinline__ typename Traits<T>::Acc
warp_dot(const T* __restrict__ a, const T* __restrict__ b, long long n, int lane) {
    typedef typename Traits<T>::Acc Acc;
    Acc s = Acc(0);
    for (long long d = lane; d < n; d += 32) s += Traits<T>::load(a[d]) * Traits<T>::load(b[d]);
    return warp_sum(s);
}

// Where a warp works: its (batch, head) bh and row (a query, or a key), the batch of the mask, its lane,
// and the first of the CHUNK output columns its block covers.
struct Place {
    long long bh, row, batch, c0;
    int lane;
};

__device__ __forceinline__ Place place(long long tiles, long long heads) {
    Place at;
    at.lane = threadIdx.x & 31;
    at.bh = (long long)blockIdx.x / tiles;
    at.row = (long long)blockIdx.x % tiles * (blockDim.x >> 5) + (threadIdx.x >> 5);
    at.batch = at.bh / heads;
    at.c0 = (long long)blockIdx.y * REFATTN_CHUNK;
    return at;
}

// The logit z = q_i . k_j * scale + b of query i and key j = i + tau of the (batch, head) bh, b the offset's
// bias (0 without one). False, the pair adding nothing, when j is outside the sequence, after i under causal,
// either row is masked, b is -inf (such an offset drops out of its rows), or z is -inf (q . k overflowed below
// the accumulation type's range: that key gets weight 0, as in the reference, which drops -inf logits). Every
// lane holds the same z (warp_dot reduces over the whole warp): a branch on it is warp-uniform.
template <typename T> __device__ __forceinline__ bool
pair_logit(const T* __restrict__ q, const T* __restrict__ k, long long bh, long long i, long long tau, long long L,
           long long D, int causal, const unsigned char* __restrict__ mask, int has_mask, long long batch,
           const typename Traits<T>::Acc* __restrict__ bias, int has_bias, long long bias_index, int lane,
           double scale, typename Traits<T>::Acc* z) {
    typedef typename Traits<T>::Acc Acc;
    const long long j = i + tau;
    if (i < 0 || i >= L || j < 0 || j >= L) return false;
    if (causal && tau > 0) return false;
    if (has_mask && (mask[batch * L + i] || mask[batch * L + j])) return false;
    const Acc b = has_bias ? bias[bias_index] : Acc(0);
    if (b == neg_inf<Acc>()) return false;
    *z = warp_dot<T>(q + (bh * L + i) * D, k + (bh * L + j) * D, D, lane) * Acc(scale) + b;
    return *z != neg_inf<Acc>();
}

// One step of the online softmax: the running maximum and sum take the logit z. Returns p = exp(z - the new
// maximum) and sets *alpha, the factor every running sum taken so far is rescaled by (exp(-inf) = 0 on the
// first valid pair).
template <typename Acc> __device__ __forceinline__ Acc
online_softmax(Acc z, Acc* running_max, Acc* running_sum, Acc* alpha) {
    const Acc new_max = z > *running_max ? z : *running_max;
    *alpha = acc_exp(*running_max - new_max);
    const Acc p = acc_exp(z - new_max);
    *running_sum = *running_sum * *alpha + p;
    *running_max = new_max;
    return p;
}

// Forward: out (BH, L, Dv) in T, lse (BH, L) in Acc (written by chunk 0 only).
template <typename T>
__global__ void fsat_sparse_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const long long* __restrict__ offsets,
                                    const typename Traits<T>::Acc* __restrict__ bias,
                                    const unsigned char* __restrict__ mask, T* __restrict__ out,
                                    typename Traits<T>::Acc* __restrict__ lse, long long heads, long long L,
                                    long long D, long long Dv, long long K, long long tiles, int has_bias,
                                    int has_mask, int causal, double scale) {
    typedef typename Traits<T>::Acc Acc;
    const Place at = place(tiles, heads);
    if (at.row >= L) return;  // the whole warp leaves together
    const long long bh = at.bh, i = at.row, batch = at.batch, c0 = at.c0;
    const int lane = at.lane;

    Acc running_max = neg_inf<Acc>();
    Acc running_sum = Acc(0);
    Acc acc[REFATTN_VPL];
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) acc[c] = Acc(0);

    for (long long m = 0; m < K; ++m) {
        const long long tau = offsets[bh * K + m];
        Acc z, alpha;
        if (!pair_logit<T>(q, k, bh, i, tau, L, D, causal, mask, has_mask, batch, bias, has_bias, bh * K + m,
                           lane, scale, &z)) continue;
        const Acc p = online_softmax(z, &running_max, &running_sum, &alpha);
        const T* vj = v + (bh * L + i + tau) * Dv;
#pragma unroll
        for (int c = 0; c < REFATTN_VPL; ++c) {
            const long long col = c0 + lane + 32 * c;
            const Acc value = col < Dv ? Traits<T>::load(vj[col]) : Acc(0);
            acc[c] = acc[c] * alpha + p * value;
        }
    }

    // A counted pair adds exp(0) = 1 at the running maximum, so running_sum >= 1 once one is seen; it is NaN
    // when q . k overflowed to +inf or NaN, which must reach out and lse (the caller reports it), not read
    // as "no valid key" (running_sum > 0 is false for NaN).
    const bool has_key = running_sum != Acc(0);
    const Acc inverse = has_key ? Acc(1) / running_sum : Acc(0);
    T* oi = out + (bh * L + i) * Dv;
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) {
        const long long col = c0 + lane + 32 * c;
        if (col < Dv) oi[col] = Traits<T>::store(acc[c] * inverse);
    }
    if (blockIdx.y == 0 && lane == 0) {
        lse[bh * L + i] = has_key ? running_max + acc_log(running_sum) : neg_inf<Acc>();
    }
}

// Backward, query side: dq (BH, L, D) in T; lse, delta (BH, L) and dz (BH, K, L) in Acc, written
// by chunk 0 only. Pass 1 recomputes lse and sum_m p_m dp_m (= dout_i . out_i) with an online
// softmax; pass 2 forms dz_{i,m} = p_{i,m} (dp_{i,m} - delta_i), delta_i = dout_i . out_i - dlse_i
// (dlse ignored on rows without a valid key), and dq_i = scale * sum_m dz_{i,m} k_j.
template <typename T>
__global__ void fsat_sparse_backward_query(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const long long* __restrict__ offsets,
                                           const typename Traits<T>::Acc* __restrict__ bias,
                                           const unsigned char* __restrict__ mask, const T* __restrict__ dout,
                                           const typename Traits<T>::Acc* __restrict__ dlse,
                                           T* __restrict__ dq, typename Traits<T>::Acc* __restrict__ lse,
                                           typename Traits<T>::Acc* __restrict__ delta,
                                           typename Traits<T>::Acc* __restrict__ dz, long long heads,
                                           long long L, long long D, long long Dv, long long K, long long tiles,
                                           int has_bias, int has_mask, int has_dlse, int causal, double scale) {
    typedef typename Traits<T>::Acc Acc;
    const Place at = place(tiles, heads);
    if (at.row >= L) return;  // the whole warp leaves together
    const long long bh = at.bh, i = at.row, batch = at.batch, c0 = at.c0;
    const int lane = at.lane;
    const T* doi = dout + (bh * L + i) * Dv;

    // Pass 1: running max, running sum of exp, running sum of exp * dp.
    Acc running_max = neg_inf<Acc>();
    Acc running_sum = Acc(0);
    Acc running_dot = Acc(0);
    for (long long m = 0; m < K; ++m) {
        const long long tau = offsets[bh * K + m];
        Acc z, alpha;
        if (!pair_logit<T>(q, k, bh, i, tau, L, D, causal, mask, has_mask, batch, bias, has_bias, bh * K + m,
                           lane, scale, &z)) continue;
        const Acc dp = warp_dot<T>(doi, v + (bh * L + i + tau) * Dv, Dv, lane);
        const Acc p = online_softmax(z, &running_max, &running_sum, &alpha);
        running_dot = running_dot * alpha + p * dp;
    }
    const bool has_key = running_sum != Acc(0);  // NaN (an overflow) included, as in the forward
    const Acc row_lse = has_key ? running_max + acc_log(running_sum) : neg_inf<Acc>();
    Acc row_delta = has_key ? running_dot / running_sum : Acc(0);
    if (has_key && has_dlse) row_delta -= dlse[bh * L + i];

    // Pass 2: dz and dq.
    Acc acc[REFATTN_VPL];
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) acc[c] = Acc(0);
    for (long long m = 0; m < K; ++m) {
        const long long tau = offsets[bh * K + m];
        Acc z;
        Acc g = Acc(0);
        if (has_key && pair_logit<T>(q, k, bh, i, tau, L, D, causal, mask, has_mask, batch, bias, has_bias,
                                     bh * K + m, lane, scale, &z)) {
            const long long j = i + tau;
            const T* kj = k + (bh * L + j) * D;
            const Acc dp = warp_dot<T>(doi, v + (bh * L + j) * Dv, Dv, lane);
            g = acc_exp(z - row_lse) * (dp - row_delta);
#pragma unroll
            for (int c = 0; c < REFATTN_VPL; ++c) {
                const long long col = c0 + lane + 32 * c;
                if (col < D) acc[c] += g * Traits<T>::load(kj[col]);
            }
        }
        if (blockIdx.y == 0 && lane == 0) dz[(bh * K + m) * L + i] = g;
    }
    T* dqi = dq + (bh * L + i) * D;
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) {
        const long long col = c0 + lane + 32 * c;
        if (col < D) dqi[col] = Traits<T>::store(acc[c] * Acc(scale));
    }
    if (blockIdx.y == 0 && lane == 0) {
        lse[bh * L + i] = row_lse;
        delta[bh * L + i] = row_delta;
    }
}

// Backward, key side: one warp per key j, gathering from the queries i = j - tau_m (one query per
// offset, so no atomics): dk_j = scale * sum_m dz_{i,m} q_i, dv_j = sum_m p_{i,m} dout_i. Reads
// lse and delta written by fsat_sparse_backward_query. Chunk c covers dk columns and dv columns
// [c * CHUNK, (c + 1) * CHUNK).
template <typename T>
__global__ void fsat_sparse_backward_key(const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, const long long* __restrict__ offsets,
                                         const typename Traits<T>::Acc* __restrict__ bias,
                                         const unsigned char* __restrict__ mask, const T* __restrict__ dout,
                                         const typename Traits<T>::Acc* __restrict__ lse,
                                         const typename Traits<T>::Acc* __restrict__ delta, T* __restrict__ dk,
                                         T* __restrict__ dv, long long heads, long long L, long long D,
                                         long long Dv, long long K, long long tiles, int has_bias, int has_mask,
                                         int causal, double scale) {
    typedef typename Traits<T>::Acc Acc;
    const Place at = place(tiles, heads);
    if (at.row >= L) return;  // the whole warp leaves together
    const long long bh = at.bh, j = at.row, batch = at.batch, c0 = at.c0;
    const int lane = at.lane;

    const T* vj = v + (bh * L + j) * Dv;

    Acc acc_k[REFATTN_VPL];
    Acc acc_v[REFATTN_VPL];
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) {
        acc_k[c] = Acc(0);
        acc_v[c] = Acc(0);
    }
    for (long long m = 0; m < K; ++m) {
        const long long tau = offsets[bh * K + m];
        const long long i = j - tau;
        Acc z;
        if (!pair_logit<T>(q, k, bh, i, tau, L, D, causal, mask, has_mask, batch, bias, has_bias, bh * K + m,
                           lane, scale, &z)) continue;
        const Acc row_lse = lse[bh * L + i];
        if (row_lse == neg_inf<Acc>()) continue;  // cannot happen for a valid pair; kept as a guard
        const T* qi = q + (bh * L + i) * D;
        const T* doi = dout + (bh * L + i) * Dv;
        const Acc dp = warp_dot<T>(doi, vj, Dv, lane);
        const Acc p = acc_exp(z - row_lse);
        const Acc g = p * (dp - delta[bh * L + i]);
#pragma unroll
        for (int c = 0; c < REFATTN_VPL; ++c) {
            const long long col = c0 + lane + 32 * c;
            if (col < D) acc_k[c] += g * Traits<T>::load(qi[col]);
            if (col < Dv) acc_v[c] += p * Traits<T>::load(doi[col]);
        }
    }
    T* dkj = dk + (bh * L + j) * D;
    T* dvj = dv + (bh * L + j) * Dv;
#pragma unroll
    for (int c = 0; c < REFATTN_VPL; ++c) {
        const long long col = c0 + lane + 32 * c;
        if (col < D) dkj[col] = Traits<T>::store(acc_k[c] * Acc(scale));
        if (col < Dv) dvj[col] = Traits<T>::store(acc_v[c]);
    }
}
