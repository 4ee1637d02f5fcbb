// FSAT step 2a's w-weighted spectrum (backends/torch/fsat/estimate.py, WeightedCross) on the CPU:
//     mixed[b, h, :] = sum_d w[h, d] * rfft(reverse(a[b, h, :, d]), N) * rfft(b[b, h, :, d], N),
// the sum in the order of d. The transforms are those of torch's MKL (its DFTI functions, which libtorch_cpu
// exports; this library links it). A chunk of features at a time: their rows are transposed from tiles of positions
// (as in fsat_cross.cpp); one thread transforms a feature's two rows in place and multiplies them while they sit in
// its core's cache; the chunk's products are then added bin range by bin range, in the order of d whatever the
// number of threads. torch.fft's batched transforms of a block of rows read and write them from memory: twice the
// time at N = 2^17 (WeightedCross at L = 65,536, H = 8, Dc = 64: 278 against 557 ms).

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <omp.h>

#include "parallel.h"
#include "rows.h"

extern "C" {  // oneMKL's DFTI C interface (mkl_dfti.h), as exported by libtorch_cpu
long DftiCreateDescriptor_s_1d(void** handle, int domain, ...);
long DftiCreateDescriptor_d_1d(void** handle, int domain, ...);
long DftiSetValue(void* handle, int parameter, ...);
long DftiCommitDescriptor(void* handle);
long DftiComputeForward(void* handle, void* data, ...);
long DftiFreeDescriptor(void** handle);
}

namespace {

// mkl_dfti.h's values of the configuration parameters and values used here
constexpr int DFTI_CONJUGATE_EVEN_STORAGE = 10, DFTI_PLACEMENT = 11, DFTI_THREAD_LIMIT = 27;
constexpr int DFTI_REAL = 33, DFTI_COMPLEX_COMPLEX = 39, DFTI_INPLACE = 43;

constexpr int64_t BINS_PER_RANGE = 4096;  // the products' work per thread: at least this many bins
constexpr size_t CACHED_LENGTHS = 4;    // transforms of this many lengths kept committed per precision

// One committed in-place real-to-complex transform of length n per thread; committing one costs about a
// millisecond at n = 2^17, more than a transform, so they are kept (DFTI_THREAD_LIMIT 1: the threads are ours).
template <typename T>
class Transforms {
  public:
    Transforms(int64_t n, int threads) : handles_(threads, nullptr) {
        for (void*& handle : handles_) {
            status_ = create(&handle, n);
            if (status_ == 0) status_ = DftiSetValue(handle, DFTI_PLACEMENT, DFTI_INPLACE);
            if (status_ == 0) status_ = DftiSetValue(handle, DFTI_CONJUGATE_EVEN_STORAGE, DFTI_COMPLEX_COMPLEX);
            if (status_ == 0) status_ = DftiSetValue(handle, DFTI_THREAD_LIMIT, 1L);
            if (status_ == 0) status_ = DftiCommitDescriptor(handle);
            if (status_ != 0) return;
        }
    }
    ~Transforms() {
        for (void*& handle : handles_) {
            if (handle != nullptr) DftiFreeDescriptor(&handle);
        }
    }
    Transforms(const Transforms&) = delete;
    Transforms& operator=(const Transforms&) = delete;

    long status() const { return status_; }
    int threads() const { return static_cast<int>(handles_.size()); }
    long forward(int thread, T* row) const { return DftiComputeForward(handles_[thread], row); }

    // The transforms of length n for at least `threads` threads, committed on first use; shared, so a call still
    // holding them keeps them when another call evicts them from the cache.
    static std::shared_ptr<const Transforms> get(int64_t n, int threads) {
        static std::mutex mutex;
        static std::map<int64_t, std::shared_ptr<const Transforms>> cache;
        std::lock_guard<std::mutex> lock(mutex);
        auto found = cache.find(n);
        if (found != cache.end() && found->second->threads() >= threads) return found->second;
        auto made = std::make_shared<const Transforms>(n, threads);
        if (made->status() != 0) return made;
        if (found == cache.end() && cache.size() >= CACHED_LENGTHS) cache.erase(cache.begin());
        cache[n] = made;
        return made;
    }

  private:
    static long create(void** handle, int64_t n) {
        if constexpr (sizeof(T) == 4) {
            return DftiCreateDescriptor_s_1d(handle, DFTI_REAL, static_cast<long>(n));
        } else {
            return DftiCreateDescriptor_d_1d(handle, DFTI_REAL, static_cast<long>(n));
        }
    }

    std::vector<void*> handles_;
    long status_ = 0;
};

// rows[j, :L] = x[:, first + j] (reversed when `reverse`) for j < count, the rows `stride` apart, a tile of positions
// at a time.
template <typename T>
void transpose(const T* x, int64_t length, int64_t stride_t, int64_t stride_f, int64_t first, int64_t count,
               bool reverse, T* rows, int64_t stride, int threads) {
    const int64_t tiles = (length + refattn::TILE - 1) / refattn::TILE;
    refattn::parallel_rows(tiles, threads, [&](int64_t start, int64_t stop) {
        for (int64_t tile = start; tile < stop; ++tile) {
            const int64_t begin = tile * refattn::TILE;
            refattn::transpose_tile(x + first * stride_f, stride_t, stride_f, count, begin,
                                    std::min(length, begin + refattn::TILE), length, reverse, rows, stride);
        }
    }, 16);
}

// For each j < count: rows a_j = first + j * stride and b_j = second + j * stride (their first L entries set) are
// zero-padded to n and transformed in place, then a_j becomes weights[j] * a_j * b_j, bin by bin: one thread does
// all three while both rows sit in its cache.
template <typename T>
long weighted_products(const Transforms<T>& transforms, T* first, T* second, int64_t count, int64_t stride,
                       const T* weights, int64_t length, int64_t n, int threads) {
    const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
    const int64_t bins = n / 2 + 1;
    long failed = 0;
#pragma omp parallel for num_threads(used) schedule(static, 1) reduction(max : failed)
    for (int64_t j = 0; j < count; ++j) {
        T* p = first + j * stride;
        T* q = second + j * stride;
        std::fill(p + length, p + n + 2, T(0));  // the previous chunk's spectrum is there
        std::fill(q + length, q + n + 2, T(0));
        const int thread = omp_get_thread_num();
        const long status = std::max(transforms.forward(thread, p), transforms.forward(thread, q));
        failed = std::max(failed, status);
        const T weight = weights[j];
        for (int64_t i = 0; i < bins; ++i) {
            const T re = p[2 * i] * q[2 * i] - p[2 * i + 1] * q[2 * i + 1];
            const T im = p[2 * i] * q[2 * i + 1] + p[2 * i + 1] * q[2 * i];
            p[2 * i] = weight * re;
            p[2 * i + 1] = weight * im;
        }
    }
    return failed;
}

// mixed[i] += rows[j][i] over j < count in the order of j, bin range by bin range.
template <typename T>
void add_rows(const T* rows, int64_t count, int64_t stride, T* mixed, int64_t bins, int threads) {
    refattn::parallel_rows(bins, threads, [&](int64_t start, int64_t stop) {
        for (int64_t j = 0; j < count; ++j) {
            const T* row = rows + j * stride;
            for (int64_t i = 2 * start; i < 2 * stop; ++i) mixed[i] += row[i];
        }
    }, BINS_PER_RANGE);
}

// shape (B, H, L, F); strides of a and b (B, H, L, F) in elements; w (H, F) contiguous; mixed (B, H, N / 2 + 1)
// complex, contiguous; rows: scratch of 2 * chunk rows of N + 2 entries. Returns 0, or the DFTI status of a failure.
template <typename T>
long weighted_spectrum(const T* a, const T* b, const int64_t* shape, const int64_t* stride_a, const int64_t* stride_b,
                       const T* w, T* mixed, int64_t n, T* rows, int64_t chunk, int threads) {
    const int64_t batch = shape[0], heads = shape[1], length = shape[2], features = shape[3];
    const int64_t bins = n / 2 + 1, stride = n + 2;
    const auto transforms = Transforms<T>::get(n, threads);
    if (transforms->status() != 0) return transforms->status();
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
        const int64_t bi = bh / heads, h = bh % heads;
        const T* head_a = a + bi * stride_a[0] + h * stride_a[1];
        const T* head_b = b + bi * stride_b[0] + h * stride_b[1];
        T* out = mixed + 2 * bh * bins;
        std::fill(out, out + 2 * bins, T(0));
        for (int64_t first = 0; first < features; first += chunk) {
            const int64_t count = std::min(chunk, features - first);
            T* reversed_rows = rows;  // a's rows, then b's
            T* forward_rows = rows + count * stride;
            transpose(head_a, length, stride_a[2], stride_a[3], first, count, true, reversed_rows, stride, threads);
            transpose(head_b, length, stride_b[2], stride_b[3], first, count, false, forward_rows, stride, threads);
            const long failed = weighted_products(*transforms, reversed_rows, forward_rows, count, stride,
                                                  w + h * features + first, length, n, threads);
            if (failed != 0) return failed;
            add_rows(reversed_rows, count, stride, out, bins, threads);
        }
    }
    return 0;
}

}  // namespace

#define REFATTN_ENTRY_POINTS(T, SUFFIX)                                                                            \
    extern "C" long fsat_weighted_spectrum_##SUFFIX(const T* a, const T* b, const int64_t* shape,                  \
                                                    const int64_t* stride_a, const int64_t* stride_b, const T* w,  \
                                                    T* mixed, int64_t n, T* rows, int64_t chunk, int threads) {    \
        return weighted_spectrum<T>(a, b, shape, stride_a, stride_b, w, mixed, n, rows, chunk, threads);          \
    }

REFATTN_ENTRY_POINTS(float, float32)
REFATTN_ENTRY_POINTS(double, float64)
