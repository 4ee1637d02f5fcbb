// Routing step 3 (spec/routing.md, "route") on the CPU: each row of similarities takes its W largest unpadded
// positions, ties to the lower position, listed in increasing position; -1 fills the slots of a row with fewer
// than W unpadded positions. The same members as the reference's partition rule, from a few reads of the row:
//
// 1. Group maxima. Cut the row into G groups (about 4W), group j the positions j, j + G, j + 2G, ... (so the
//    maxima are elementwise over rows of G scores, in vector registers). A bound M with at least W group
//    maxima >= M has at least W scores >= M, so theta, the row's W-th largest score, is >= M too: every score
//    >= theta is a candidate, a score >= M. M is the least maximum whose order key reaches a bound read from
//    the leading 16 bits of the maxima's keys (two histograms), a little below their W-th largest, with no sort.
// 2. Candidates, in position order: the scores >= M of the groups whose maximum is >= M (about W groups),
//    read row by row. theta is their W-th largest (a partition of about W values); the row takes every
//    candidate > theta, then candidates = theta in position order while slots remain.
//
// Arrays are C-contiguous: scores (R, L) with rows of one batch element consecutive (`rows_per_batch` of
// them), padded (B, L) bytes (1 = padding) or null, members (R, W) int64. A row holding NaN or +-inf at an
// unpadded position is left unwritten and counted: the caller decides (its scores were checked finite).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "parallel.h"

namespace {

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
    using type = uint32_t;
};
template <>
struct KeyOf<double> {
    using type = uint64_t;
};

// An unsigned key in the order of the values (-0 and +0 one key, as they are equal); not for NaN.
template <typename T>
typename KeyOf<T>::type order_key(T x) {
    using U = typename KeyOf<T>::type;
    constexpr U sign = U(1) << (8 * sizeof(U) - 1);
    U bits;
    const T canonical = x + T(0);  // -0 + 0 = +0
    std::memcpy(&bits, &canonical, sizeof bits);
    return (bits & sign) ? ~bits : (bits | sign);
}

// The largest key P whose low bits (all but the leading 16) are 0 with at least `rank` of `keys` >= P
// (rank <= n): a bound just below the rank-th largest key, from two histograms of 8 bits.
template <typename U>
U prefix_bound(const U* keys, int64_t n, int64_t rank) {
    constexpr int high = 8 * sizeof(U) - 8, low = 8 * sizeof(U) - 16;
    int64_t counts[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++counts[keys[i] >> high];
    int64_t above = 0;
    int first = 255;
    while (above + counts[first] < rank) above += counts[first--];
    int64_t finer[256] = {0};
    for (int64_t i = 0; i < n; ++i)
        if (int(keys[i] >> high) == first) ++finer[(keys[i] >> low) & 255];
    int second = 255;
    while (above + finer[second] < rank) above += finer[second--];
    return (U(first) << high) | (U(second) << low);
}

// Groups per row: about 4W (their maxima's 16-bit bound then sits close to theta), at most L.
int64_t group_count(int64_t length, int64_t window) { return std::min(length, 4 * window); }

template <typename T>
struct Scratch {  // per thread, reused row after row
    std::vector<T> maxima, probes, values;
    std::vector<typename KeyOf<T>::type> keys;
    std::vector<int64_t> columns, positions;
};

// Members of one row; false (nothing written) if an unpadded score is NaN or infinite.
template <typename T>
bool route_row(const T* s, const uint8_t* padded, int64_t length, int64_t window, int64_t groups, int64_t* members,
               Scratch<T>& scratch) {
    using U = typename KeyOf<T>::type;
    const T lowest = -std::numeric_limits<T>::infinity();
    int64_t unpadded = length;
    if (padded) unpadded -= std::count(padded, padded + length, uint8_t(1));
    if (unpadded <= window) {  // every unpadded position, then -1
        int64_t slot = 0;
        bool finite = true;
        for (int64_t t = 0; t < length; ++t) {
            if (padded && padded[t]) continue;
            finite &= std::isfinite(s[t]);
            members[slot++] = t;
        }
        std::fill(members + slot, members + window, int64_t(-1));
        return finite;
    }
    // The row as rows of `groups` scores: group j is column j (positions j, j + G, ...), so the maxima and the
    // probes (x - x: 0, or NaN for NaN and +-inf) are elementwise over rows, in vector registers.
    auto& maxima = scratch.maxima;
    auto& probes = scratch.probes;
    maxima.assign(groups, lowest);
    probes.assign(groups, T(0));
    T* top = maxima.data();
    T* probe = probes.data();
    for (int64_t first = 0; first < length; first += groups) {
        const int64_t count = std::min(groups, length - first);
        const T* x = s + first;
        if (padded) {
            const uint8_t* p = padded + first;
#pragma omp simd
            for (int64_t j = 0; j < count; ++j) {
                const T score = p[j] ? lowest : x[j];
                top[j] = score > top[j] ? score : top[j];
                probe[j] += p[j] ? T(0) : x[j] - x[j];
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < count; ++j) {
                top[j] = x[j] > top[j] ? x[j] : top[j];
                probe[j] += x[j] - x[j];
            }
        }
    }
    T probe_sum = 0;
    for (int64_t j = 0; j < groups; ++j) probe_sum += probe[j];
    if (probe_sum != 0) return false;
    auto& keys = scratch.keys;
    keys.resize(groups);
    for (int64_t j = 0; j < groups; ++j) keys[j] = order_key(top[j]);
    const U bound = prefix_bound(keys.data(), groups, window);
    // M, the least of the maxima with keys >= bound: at least W maxima, so W scores, are >= M.
    auto& columns = scratch.columns;
    columns.clear();
    T least = std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < groups; ++j) {
        if (keys[j] < bound) continue;
        columns.push_back(j);
        least = std::min(least, top[j]);
    }
    // Row by row, the kept columns in order: the candidates (scores >= M) come in position order.
    auto& values = scratch.values;
    auto& positions = scratch.positions;
    const int64_t rows = (length + groups - 1) / groups;
    values.resize(rows * columns.size());
    positions.resize(rows * columns.size());
    int64_t count = 0;
    for (int64_t first = 0; first < length; first += groups) {
        for (const int64_t j : columns) {
            const int64_t t = first + j;
            if (t >= length) break;
            values[count] = s[t];
            positions[count] = t;
            count += s[t] >= least && !(padded && padded[t]);
        }
    }
    values.resize(count);
    auto& partition = scratch.maxima;  // free again: the W-th largest candidate is theta
    partition.assign(values.begin(), values.end());
    std::nth_element(partition.begin(), partition.begin() + (window - 1), partition.end(), std::greater<T>());
    const T theta = partition[window - 1];
    int64_t ties_wanted = window;
    for (const T x : values) ties_wanted -= x > theta;
    int64_t slot = 0;
    for (size_t c = 0; c < values.size(); ++c) {
        if (values[c] > theta || (values[c] == theta && ties_wanted-- > 0)) members[slot++] = positions[c];
    }
    return true;
}

template <typename T>
int64_t route(const T* scores, const uint8_t* padded, int64_t rows, int64_t length, int64_t window,
              int64_t rows_per_batch, int64_t* members, int threads) {
    const int64_t groups = group_count(length, window);
    std::atomic<int64_t> failed{0};
    refattn::parallel_rows(rows, threads, [&](int64_t start, int64_t stop) {
        Scratch<T> scratch;
        for (int64_t r = start; r < stop; ++r) {
            const uint8_t* padded_row = padded ? padded + (r / rows_per_batch) * length : nullptr;
            if (!route_row(scores + r * length, padded_row, length, window, groups, members + r * window, scratch))
                ++failed;
        }
    }, 16);
    return failed.load();
}

}  // namespace

#define REFATTN_ENTRY_POINTS(T, SUFFIX)                                                                              \
    extern "C" int64_t routing_route_##SUFFIX(const T* scores, const uint8_t* padded, int64_t rows, int64_t length, \
                                              int64_t window, int64_t rows_per_batch, int64_t* members,            \
                                              int threads) {                                                       \
        return route<T>(scores, padded, rows, length, window, rows_per_batch, members, threads);                   \
    }

REFATTN_ENTRY_POINTS(float, float32)
REFATTN_ENTRY_POINTS(double, float64)
