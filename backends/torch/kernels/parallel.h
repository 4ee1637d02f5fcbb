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

}  // namespace refattn
