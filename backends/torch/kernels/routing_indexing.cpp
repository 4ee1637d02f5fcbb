// Routing's scatter of cluster rows into token rows (backends/torch/routing/indexing.py, add_rows_into) on the
// CPU: out[rows[i]] += values[i] for i = 0, 1, ..., n - 1, so each token row sums its terms in slot order, as
// torch's index_add_ does, and the result does not depend on the thread count. Each thread owns a range of
// token rows and reads the whole index (n entries, a few per token): no two threads write one row.
//
// Arrays are C-contiguous: out (total, F), values (n, F), rows (n) int64 in [0, total).

#include <cstdint>

#include "parallel.h"

namespace {

template <typename T>
void add_rows(T* out, const int64_t* rows, const T* values, int64_t n, int64_t total, int64_t features, int threads) {
    refattn::parallel_rows(total, threads, [&](int64_t start, int64_t stop) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t row = rows[i];
            if (row < start || row >= stop) continue;
            T* target = out + row * features;
            const T* term = values + i * features;
#pragma omp simd
            for (int64_t f = 0; f < features; ++f) target[f] += term[f];
        }
    }, 1024);
}

}  // namespace

#define REFATTN_ENTRY_POINTS(T, SUFFIX)                                                                              \
    extern "C" void routing_add_rows_##SUFFIX(T* out, const int64_t* rows, const T* values, int64_t n,             \
                                              int64_t total, int64_t features, int threads) {                      \
        add_rows<T>(out, rows, values, n, total, features, threads);                                               \
    }

REFATTN_ENTRY_POINTS(float, float32)
REFATTN_ENTRY_POINTS(double, float64)
