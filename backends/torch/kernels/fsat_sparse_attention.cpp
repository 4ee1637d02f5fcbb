// FSAT's sparse attention (spec/fsat.md step 3) fused on the CPU: row i of each (batch, head) meets the
// rows i + tau_m of its K selected offsets, its logits, softmax and output computed while the row is in
// cache. The sums are those of the torch backend's sliced path (backends/torch/fsat/sparse_attention.py),
// term for term and in the same order of offsets; the order inside a dot product differs, and the weights
// are exp(logit - max) / sum, one exp per pair, where the sliced path takes exp(logit - lse): equal to rounding.
//
// Arrays are C-contiguous: q, k (B, H, L, D), v, out, dout (B, H, L, Dv), offsets (B, H, K) int64,
// bias (B, H, K) or null, unpadded (B, L) bytes (1 = a real token) or null, lse (B, H, L), probs and
// dz (B, H, L, K). T is float or double, the compute dtype. Work is split over `threads` OpenMP threads
// by blocks of rows (queries, or keys in the key pass): each row's results are written by one thread only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "parallel.h"

namespace {

using refattn::parallel_blocks;

// Rows per block of work: at H = 8, D = 64, 7 to 13 % faster than one range of rows per thread (the three passes
// at L = 16,384 and 65,536, medians of 10 interleaved rounds), as fast as blocks of 256.
constexpr int64_t BLOCK = 2048;

struct Shape {
    int64_t batch, heads, length, dim, dim_v, count;
};

template <typename T>
T dot(const T* x, const T* y, int64_t n) {
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += x[d] * y[d];
    return sum;
}

template <typename T>
void add_scaled(T* target, T weight, const T* x, int64_t n) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) target[d] += weight * x[d];
}

// Whether (i, i + tau) is a pair of the attention: inside [0, L), causal-allowed, both tokens real.
inline bool valid_pair(int64_t i, int64_t j, int64_t tau, int64_t length, bool causal, const uint8_t* unpadded_b) {
    if (j < 0 || j >= length || (causal && tau > 0)) return false;
    return unpadded_b == nullptr || (unpadded_b[i] && unpadded_b[j]);
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const int64_t* offsets, const T* bias, const uint8_t* unpadded,
             Shape s, bool causal, T scale, T* out, T* lse, T* probs, int threads) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    parallel_blocks(s.batch * s.heads * s.length, threads, [&](int64_t start, int64_t stop) {
        for (int64_t row = start; row < stop; ++row) {
            const int64_t bh = row / s.length, i = row % s.length, b = bh / s.heads;
            const int64_t* tau = offsets + bh * s.count;
            const uint8_t* unpadded_b = unpadded ? unpadded + b * s.length : nullptr;
            const T* q_i = q + row * s.dim;
            T* p = probs + row * s.count;
            T top = neg_inf;
            for (int64_t m = 0; m < s.count; ++m) {
                const int64_t j = i + tau[m];
                const T shift = bias ? bias[bh * s.count + m] : T(0);
                if (!valid_pair(i, j, tau[m], s.length, causal, unpadded_b) || shift == neg_inf) {
                    p[m] = neg_inf;  // a bias of -inf removes its offset whatever q . k is
                    continue;
                }
                p[m] = dot(q_i, k + (bh * s.length + j) * s.dim, s.dim) * scale + shift;
                top = (p[m] > top || std::isnan(p[m])) ? p[m] : top;
            }
            T* o = out + row * s.dim_v;
            std::fill(o, o + s.dim_v, T(0));
            if (top == neg_inf) {  // no pair: lse -inf, weights and output 0
                lse[row] = neg_inf;
                std::fill(p, p + s.count, T(0));
                continue;
            }
            T total = 0;
            if (std::isfinite(top)) {  // one exp per pair: p = exp(logit - top) / total = exp(logit - lse)
                for (int64_t m = 0; m < s.count; ++m) total += (p[m] = std::exp(p[m] - top));
                lse[row] = top + std::log(total);
                const T inverse = T(1) / total;
                for (int64_t m = 0; m < s.count; ++m) p[m] *= inverse;
            } else {  // +inf or NaN logits: lse +inf or NaN, as logsumexp, and p = exp(logit), as the sliced path
                for (int64_t m = 0; m < s.count; ++m) total += std::exp(p[m] - top);
                lse[row] = std::isinf(top) ? top : top + std::log(total);
                for (int64_t m = 0; m < s.count; ++m) p[m] = std::exp(p[m]);
            }
            for (int64_t m = 0; m < s.count; ++m) {
                const int64_t j = i + tau[m];
                if (j >= 0 && j < s.length) add_scaled(o, p[m], v + (bh * s.length + j) * s.dim_v, s.dim_v);
            }
        }
    }, BLOCK);
}

// dz[i, m] = p[i, m] (dout_i . v_{i + tau_m} - dout_i . out_i + dlse_i) and dq_i = scale sum_m dz[i, m] k_{i + tau_m}.
template <typename T>
void backward_query(const T* k, const T* v, const int64_t* offsets, const T* probs, const T* lse, const T* out,
                    const T* dout, const T* dlse, Shape s, T scale, T* dz, T* dq, int threads) {
    parallel_blocks(s.batch * s.heads * s.length, threads, [&](int64_t start, int64_t stop) {
        for (int64_t row = start; row < stop; ++row) {
            const int64_t bh = row / s.length, i = row % s.length;
            const int64_t* tau = offsets + bh * s.count;
            const T* g = dout + row * s.dim_v;
            T row_term = dot(g, out + row * s.dim_v, s.dim_v);
            if (dlse && std::isfinite(lse[row])) row_term -= dlse[row];
            T* dq_i = dq + row * s.dim;
            std::fill(dq_i, dq_i + s.dim, T(0));
            for (int64_t m = 0; m < s.count; ++m) {
                const int64_t j = i + tau[m];
                const bool inside = j >= 0 && j < s.length;
                const T dp = inside ? dot(g, v + (bh * s.length + j) * s.dim_v, s.dim_v) : T(0);
                const T d = (dp - row_term) * probs[row * s.count + m];
                dz[row * s.count + m] = d;
                if (inside) add_scaled(dq_i, d, k + (bh * s.length + j) * s.dim, s.dim);
            }
            for (int64_t d = 0; d < s.dim; ++d) dq_i[d] *= scale;
        }
    }, BLOCK);
}

// For key j: dk_j = scale sum_m dz[j - tau_m, m] q_{j - tau_m}, dv_j = sum_m p[j - tau_m, m] dout_{j - tau_m}.
template <typename T>
void backward_key(const T* q, const int64_t* offsets, const T* probs, const T* dout, const T* dz, Shape s, T scale,
                  T* dk, T* dv, int threads) {
    parallel_blocks(s.batch * s.heads * s.length, threads, [&](int64_t start, int64_t stop) {
        for (int64_t row = start; row < stop; ++row) {
            const int64_t bh = row / s.length, j = row % s.length;
            const int64_t* tau = offsets + bh * s.count;
            T* dk_j = dk + row * s.dim;
            T* dv_j = dv + row * s.dim_v;
            std::fill(dk_j, dk_j + s.dim, T(0));
            std::fill(dv_j, dv_j + s.dim_v, T(0));
            for (int64_t m = 0; m < s.count; ++m) {
                const int64_t i = j - tau[m];
                if (i < 0 || i >= s.length) continue;
                const int64_t source = bh * s.length + i;
                add_scaled(dk_j, dz[source * s.count + m], q + source * s.dim, s.dim);
                add_scaled(dv_j, probs[source * s.count + m], dout + source * s.dim_v, s.dim_v);
            }
            for (int64_t d = 0; d < s.dim; ++d) dk_j[d] *= scale;
        }
    }, BLOCK);
}

}  // namespace

#define REFATTN_ENTRY_POINTS(T, SUFFIX)                                                                              \
    extern "C" void fsat_sparse_forward_##SUFFIX(const T* q, const T* k, const T* v, const int64_t* offsets,         \
                                                 const T* bias, const uint8_t* unpadded, const int64_t* shape,       \
                                                 int causal, double scale, T* out, T* lse, T* probs, int threads) {  \
        forward<T>(q, k, v, offsets, bias, unpadded, Shape{shape[0], shape[1], shape[2], shape[3], shape[4],         \
                   shape[5]}, causal != 0, T(scale), out, lse, probs, threads);                                      \
    }                                                                                                                \
    extern "C" void fsat_sparse_backward_query_##SUFFIX(const T* k, const T* v, const int64_t* offsets,              \
                                                        const T* probs, const T* lse, const T* out, const T* dout,   \
                                                        const T* dlse, const int64_t* shape, double scale, T* dz,    \
                                                        T* dq, int threads) {                                        \
        backward_query<T>(k, v, offsets, probs, lse, out, dout, dlse, Shape{shape[0], shape[1], shape[2], shape[3],  \
                          shape[4], shape[5]}, T(scale), dz, dq, threads);                                           \
    }                                                                                                                \
    extern "C" void fsat_sparse_backward_key_##SUFFIX(const T* q, const int64_t* offsets, const T* probs,            \
                                                      const T* dout, const T* dz, const int64_t* shape, double scale, \
                                                      T* dk, T* dv, int threads) {                                   \
        backward_key<T>(q, offsets, probs, dout, dz, Shape{shape[0], shape[1], shape[2], shape[3], shape[4],         \
                        shape[5]}, T(scale), dk, dv, threads);                                                       \
    }

REFATTN_ENTRY_POINTS(float, float32)
REFATTN_ENTRY_POINTS(double, float64)
