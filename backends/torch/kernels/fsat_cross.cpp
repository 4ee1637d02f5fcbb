// FSAT step 1's FFT operands (backends/torch/fsat/cross.py, padded_rows) on the CPU: x (B, 1, L, F), a strided
// view of one head's features, transposed into rows (B, 1, F, N) that the FFT reads along the sequence, and
// reversed along it for the cross's first operand. Only the first L entries of each row are written (the
// caller keeps the zero padding). A tile of 64 positions is read once from memory and its F rows written from
// cache, so neither the strided reads nor a separate reversal cost a pass of their own.

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "rows.h"

namespace {

template <typename T>
void padded_rows(const T* x, int64_t batch, int64_t length, int64_t features, int64_t stride_b, int64_t stride_t,
                 int64_t stride_f, bool reverse, T* rows, int64_t n, int threads) {
    const int64_t tiles = (length + refattn::TILE - 1) / refattn::TILE;
    refattn::parallel_rows(batch * tiles, threads, [&](int64_t start, int64_t stop) {
        for (int64_t r = start; r < stop; ++r) {
            const int64_t b = r / tiles, first = (r % tiles) * refattn::TILE;
            refattn::transpose_tile(x + b * stride_b, stride_t, stride_f, features, first,
                                    std::min(length, first + refattn::TILE), length, reverse, rows + b * features * n,
                                    n);
        }
    }, 16);
}

}  // namespace

#define REFATTN_ENTRY_POINTS(T, SUFFIX)                                                                              \
    extern "C" void fsat_padded_rows_##SUFFIX(const T* x, const int64_t* shape, const int64_t* strides, int reverse, \
                                              T* rows, int64_t n, int threads) {                                   \
        padded_rows<T>(x, shape[0], shape[1], shape[2], strides[0], strides[1], strides[2], reverse != 0, rows, n, \
                       threads);                                                                                   \
    }

REFATTN_ENTRY_POINTS(float, float32)
REFATTN_ENTRY_POINTS(double, float64)
