// Work split by rows over OpenMP threads, shared by the torch backend's CPU kernels. The libraries link the
// libgomp that torch has loaded, so the kernels run on torch's own thread pool: no threads of their own that
// would compete with its workers, which spin for a while after each parallel operation.
#pragma once

#include <algorithm>
#include <cstdint>

namespace refattn {

// body(start, stop) over [start, stop) ranges of rows, one per thread, each range at least `grain` rows.
template <typename F>
void parallel_rows(int64_t rows, int threads, F&& body, int64_t grain = 64) {
    const int64_t used = std::max<int64_t>(1, std::min<int64_t>(threads, rows / grain));
    if (used == 1) {
        body(0, rows);
        return;
    }
    const int64_t step = (rows + used - 1) / used;
#pragma omp parallel for num_threads(used) schedule(static, 1)
    for (int64_t t = 0; t < used; ++t) body(t * step, std::min(rows, (t + 1) * step));
}

// body(start, stop) over blocks of `block` rows handed out to the threads in turn: the threads move through the
// rows side by side, so rows that read the same data (FSAT's neighbouring queries and their keys) are in cache
// together, where parallel_rows would put each thread in its own distant range (at L = 65,536, H = 8, two heads).
template <typename F>
void parallel_blocks(int64_t rows, int threads, F&& body, int64_t block) {
    const int64_t blocks = (rows + block - 1) / block;
    const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
    if (used == 1) {
        body(0, rows);
        return;
    }
#pragma omp parallel for num_threads(used) schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) body(b * block, std::min(rows, (b + 1) * block));
}

}  // namespace refattn
