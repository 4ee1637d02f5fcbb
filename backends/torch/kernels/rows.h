// FSAT's FFT operands, shared by fsat_cross.cpp and fsat_spectrum.cpp: features of x transposed into the rows the
// FFT reads along the sequence, a tile of positions at a time, so that the strided reads of a tile come from
// cache and each row's part of the tile is written in one run.
#pragma once

#include <cstdint>

namespace refattn {

constexpr int64_t TILE = 64;  // positions per tile: 64 positions of 64 float32 features are 16 KiB

// rows[f * stride + t] = x[t * stride_t + f * stride_f] for features f < count and positions t in [first, last),
// at column length - 1 - t instead of t when `reverse`. A feature at a time: writing all rows at each position
// took 2 to 6 times as long (fsat_cross.cpp's copy of 16 or 64 features at L = 16,384 to 2^20).
template <typename T>
inline void transpose_tile(const T* x, int64_t stride_t, int64_t stride_f, int64_t count, int64_t first, int64_t last,
                           int64_t length, bool reverse, T* rows, int64_t stride) {
    for (int64_t f = 0; f < count; ++f) {
        T* row = rows + f * stride;
        const T* column = x + f * stride_f;
        if (reverse) {
            for (int64_t t = first; t < last; ++t) row[length - 1 - t] = column[t * stride_t];
        } else {
            for (int64_t t = first; t < last; ++t) row[t] = column[t * stride_t];
        }
    }
}

}  // namespace refattn
