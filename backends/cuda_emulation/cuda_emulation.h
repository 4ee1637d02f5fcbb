// CUDA C emulated on the CPU: the device-side names that CUDA kernels use (those of
// backends/cupy/kernels among them), for g++ (C++20), so that they execute on a machine without a
// GPU. Test infrastructure, compiled and launched by backends/cuda_emulation/__init__.py (read its
// docstring first).
//
// A launch runs the grid's blocks one after another; the threads of a block are blockDim.x * y * z
// host threads running together, so __syncthreads (a block barrier) and the warp shuffles (a
// rendezvous of the lanes in the mask) really wait for each other. Reaching a barrier or shuffle
// after threads of the block (lanes of the mask) have returned, or all live threads waiting at
// barriers that can no longer complete, stops the launch with an error: undefined behaviour on a GPU.
// It shows nothing timing-dependent (races, memory model) and nothing of speed.

#pragma once
#define REFATTN_CUDA_EMULATION 1

#include <barrier>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;  // one launch at a time (the Python side serialises launches)
inline dim3 gridDim;
constexpr int warpSize = 32;

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

namespace refattn_emulation {

constexpr std::size_t kStaticSharedLimit = 48 * 1024;  // CUDA: static shared memory per block
constexpr std::size_t kOptInSharedLimit = 227 * 1024;  // sm_90: static + opted-in dynamic per block

struct Abort {};  // unwinds an emulated thread once its launch has failed

struct Warp {
    unsigned lanes = 0;   // bit l set: lane l exists
    unsigned exited = 0;  // bit l set: lane l has returned from the kernel
    unsigned mask = 0;    // of the shuffle being gathered
    const char* name = "";
    unsigned arrived = 0;
    unsigned long long phase = 0;
    std::uint64_t values[32], results[32];
    int sources[32];
    std::condition_variable wake;
};

// The state of the block being run, guarded by `mutex`.
struct Block {
    std::mutex mutex;
    std::condition_variable wake;  // for __syncthreads
    unsigned threads = 0, exited = 0, arrived = 0;
    unsigned waiting = 0;  // threads blocked in a barrier or shuffle that has not completed
    unsigned long long phase = 0;
    std::unique_ptr<Warp[]> warps;
    unsigned warp_count = 0;
    std::vector<const void*> statics;  // __shared__ variables seen in this block
    std::size_t static_bytes = 0, dynamic_bytes = 0, dynamic_limit = 0;
    std::unique_ptr<unsigned char[]> dynamic;
    bool failed = false;
    std::string error;
};

struct Self {
    Block* block;
    unsigned warp, lane;
};
inline thread_local Self self;

inline std::string where() {
    auto triple = [](const uint3& v) {
        return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
    };
    return "block " + triple(blockIdx) + " thread " + triple(threadIdx) + ": ";
}

inline std::string hex(unsigned x) {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", x);
    return text;
}

// Record the launch's first error and wake every waiting thread (the caller holds b.mutex).
inline void report(Block& b, const std::string& what) {
    if (!b.failed) {
        b.failed = true;
        b.error = where() + what;
    }
    b.wake.notify_all();
    for (unsigned w = 0; w < b.warp_count; ++w) b.warps[w].wake.notify_all();
}

[[noreturn]] inline void fail(Block& b, const std::string& what) {
    report(b, what);
    throw Abort{};
}

inline std::string deadlock(const Block& b) {
    unsigned shuffling = 0;
    for (unsigned w = 0; w < b.warp_count; ++w) shuffling += b.warps[w].arrived;
    return "deadlock: every live thread waits (" + std::to_string(b.arrived) + " at __syncthreads, " +
           std::to_string(shuffling) + " in warp shuffles, " + std::to_string(b.exited) +
           " returned) at barriers that can no longer complete: divergent control flow";
}

// Block until `released()`. The thread that completes a rendezvous subtracts the threads it releases
// from b.waiting, so waiting + exited == threads means no thread is left to complete any of them.
template <typename Released>
void wait(std::unique_lock<std::mutex>& lock, Block& b, std::condition_variable& cv, Released released) {
    if (++b.waiting + b.exited == b.threads) fail(b, deadlock(b));
    cv.wait(lock, [&] { return released() || b.failed; });
    if (b.failed) throw Abort{};
}

inline void syncthreads() {
    Block& b = *self.block;
    std::unique_lock lock(b.mutex);
    if (b.failed) throw Abort{};
    if (b.exited)
        fail(b, "__syncthreads() reached after " + std::to_string(b.exited) +
                    " thread(s) of the block returned: a divergent barrier (undefined behaviour on a GPU)");
    const auto phase = b.phase;
    if (++b.arrived == b.threads) {
        b.arrived = 0;
        ++b.phase;
        b.waiting -= b.threads - 1;
        b.wake.notify_all();
        return;
    }
    wait(lock, b, b.wake, [&] { return b.phase != phase; });
}

// One shuffle: every lane of `mask` hands in its value and the lane it reads; the last to arrive
// hands out the results.
template <typename T>
T shuffle(const char* name, unsigned mask, T value, int source, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    Block& b = *self.block;
    Warp& w = b.warps[self.warp];
    const unsigned lane = self.lane;
    const std::string call = std::string(name) + "(mask " + hex(mask) + ")";
    std::unique_lock lock(b.mutex);
    if (b.failed) throw Abort{};
    if (width < 1 || width > 32 || (width & (width - 1))) fail(b, call + ": width must be 1, 2, 4, 8, 16 or 32");
    if (!(mask >> lane & 1u)) fail(b, call + ": the mask excludes the calling lane");
    if (mask & ~w.lanes) fail(b, call + ": the mask names lanes " + hex(mask & ~w.lanes) + " that do not exist");
    if (mask & w.exited)
        fail(b, call + " reached after lanes " + hex(mask & w.exited) +
                    " of the warp returned: a divergent shuffle (undefined behaviour on a GPU)");
    if (w.arrived && mask != w.mask)
        fail(b, call + " while other lanes of the warp are in a shuffle with mask " + hex(w.mask) +
                    " (the emulation gathers one shuffle per warp at a time)");
    if (source < 0 || source > 31 || !(mask >> source & 1u))
        fail(b, call + ": reads lane " + std::to_string(source) + ", which is not in the mask (undefined on a GPU)");
    w.mask = mask;
    w.name = name;
    std::memcpy(&w.values[lane], &value, sizeof(T));
    w.sources[lane] = source;
    const auto phase = w.phase;
    const unsigned lanes = std::popcount(mask);
    if (++w.arrived == lanes) {
        for (unsigned l = 0; l < 32; ++l)
            if (mask >> l & 1u) w.results[l] = w.values[w.sources[l]];
        w.arrived = 0;
        ++w.phase;
        b.waiting -= lanes - 1;
        w.wake.notify_all();
    } else {
        wait(lock, b, w.wake, [&] { return w.phase != phase; });
    }
    T result;
    std::memcpy(&result, &w.results[lane], sizeof(T));
    return result;
}

// A static __shared__ variable, registered when a thread first passes its declaration in a block.
inline void static_shared(const void* address, std::size_t bytes) {
    Block& b = *self.block;
    std::unique_lock lock(b.mutex);
    for (const void* seen : b.statics)
        if (seen == address) return;
    b.statics.push_back(address);
    b.static_bytes += bytes;
    if (b.static_bytes > kStaticSharedLimit)
        fail(b, "static shared memory of " + std::to_string(b.static_bytes) + " bytes exceeds CUDA's limit of " +
                    std::to_string(kStaticSharedLimit) + " bytes per block");
    const std::size_t limit = b.dynamic_limit > kStaticSharedLimit ? kOptInSharedLimit : kStaticSharedLimit;
    const std::size_t dynamic = b.dynamic_limit > kStaticSharedLimit ? b.dynamic_limit : b.dynamic_bytes;
    if (b.static_bytes + dynamic > limit)
        fail(b, "static shared memory of " + std::to_string(b.static_bytes) + " bytes plus " +
                    std::to_string(dynamic) + " bytes of dynamic shared memory exceed the limit of " +
                    std::to_string(limit) + " bytes per block");
}

// extern __shared__ arrays: the block's dynamic buffer, exactly shared_mem bytes (AddressSanitizer
// sees an access past its end), filled with 0xff bytes (NaN) because shared memory starts undefined.
inline void* dynamic_shared() { return self.block->dynamic.get(); }

inline void start_block(Block& b) {
    b.exited = b.arrived = b.waiting = 0;
    for (unsigned w = 0; w < b.warp_count; ++w) b.warps[w].exited = b.warps[w].arrived = 0;
    b.statics.clear();
    b.static_bytes = 0;
    b.dynamic.reset(new unsigned char[b.dynamic_bytes]);
    std::memset(b.dynamic.get(), 0xff, b.dynamic_bytes);
}

// The calling thread returned from the kernel.
inline void finish(Block& b) {
    std::unique_lock lock(b.mutex);
    Warp& w = b.warps[self.warp];
    ++b.exited;
    w.exited |= 1u << self.lane;
    if (b.failed) return;
    if (b.arrived)
        report(b, "returned while " + std::to_string(b.arrived) +
                      " thread(s) wait at __syncthreads(): a divergent barrier (undefined behaviour on a GPU)");
    else if (w.arrived && (w.mask >> self.lane & 1u))
        report(b, "returned while lanes of its warp wait in " + std::string(w.name) + "(mask " + hex(w.mask) +
                      "): a divergent shuffle (undefined behaviour on a GPU)");
    else if (b.waiting && b.waiting + b.exited == b.threads)
        report(b, deadlock(b));
}

// Kernel parameter types as NumPy type codes: "p<size of the pointee>" for pointers, else the kind
// (f, i, u, b) and size, so the Python side can check every argument of a launch.
template <typename A>
std::string describe() {
    if constexpr (std::is_pointer_v<A>) {
        using P = std::remove_cv_t<std::remove_pointer_t<A>>;
        if constexpr (std::is_void_v<P>) return "p0";
        else return "p" + std::to_string(sizeof(P));
    } else {
        static_assert(std::is_arithmetic_v<A>, "emulated kernels take pointers and arithmetic scalars");
        const char kind = std::is_floating_point_v<A> ? 'f'
                          : std::is_same_v<A, bool>   ? 'b'
                          : std::is_signed_v<A>       ? 'i'
                                                      : 'u';
        return kind + std::to_string(sizeof(A));
    }
}

template <typename... A>
const char* signature(void (*)(A...)) {
    static const std::string text = [] {
        std::string out;
        ((out += describe<A>() + " "), ...);
        return out;
    }();
    return text.c_str();
}

template <typename... A, std::size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>(*static_cast<A*>(args[I])...);
}

// Run kernel<<<grid, block, dynamic_bytes>>>(args...) (limits already checked by the caller).
// Returns 0, or 1 with the first error in `error`.
template <typename... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, std::size_t dynamic_bytes,
           std::size_t dynamic_limit, void** args, char* error, std::size_t error_size) {
    const std::tuple<A...> values = unpack<A...>(args, std::index_sequence_for<A...>{});
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const unsigned threads = block[0] * block[1] * block[2];
    const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
    Block b;
    b.threads = threads;
    b.warp_count = (threads + 31) / 32;
    b.warps = std::make_unique<Warp[]>(b.warp_count);
    for (unsigned w = 0; w < b.warp_count; ++w) {
        const unsigned lanes = threads - 32 * w;
        b.warps[w].lanes = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1;
    }
    b.dynamic_bytes = dynamic_bytes;
    b.dynamic_limit = dynamic_limit;
    start_block(b);
    bool stop = false;
    std::barrier boundary(threads, [&]() noexcept {
        if (b.failed) stop = true;
        else start_block(b);
    });
    auto body = [&](unsigned t) {
        self = {&b, t / 32, t % 32};
        threadIdx = {t % block[0], t / block[0] % block[1], t / (block[0] * block[1])};
        for (unsigned long long n = 0; n < blocks && !stop; ++n) {
            blockIdx = {unsigned(n % grid[0]), unsigned(n / grid[0] % grid[1]),
                        unsigned(n / (1ull * grid[0] * grid[1]))};
            try {
                std::apply(kernel, values);
            } catch (const Abort&) {
            } catch (const std::exception& e) {
                std::unique_lock lock(b.mutex);
                report(b, std::string("exception: ") + e.what());
            }
            finish(b);
            boundary.arrive_and_wait();
        }
    };
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back(body, t);
    for (auto& thread : pool) thread.join();
    if (!b.failed) return 0;
    std::snprintf(error, error_size, "%s", b.error.c_str());
    return 1;
}

}  // namespace refattn_emulation

inline void __syncthreads() { refattn_emulation::syncthreads(); }

// The shuffles with CUDA's semantics for `width` (lanes form groups of `width`; a lane reading
// outside its group gets its own value, except that __shfl_xor_sync may read an earlier group).
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    const int lane = int(refattn_emulation::self.lane), base = lane & ~(width - 1);
    return refattn_emulation::shuffle("__shfl_sync", mask, var, base + (src_lane & (width - 1)), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    const int lane = int(refattn_emulation::self.lane), base = lane & ~(width - 1), source = lane - int(delta);
    return refattn_emulation::shuffle("__shfl_up_sync", mask, var, source < base ? lane : source, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    const int lane = int(refattn_emulation::self.lane), base = lane & ~(width - 1), source = lane + int(delta);
    return refattn_emulation::shuffle("__shfl_down_sync", mask, var, source >= base + width ? lane : source, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    const int lane = int(refattn_emulation::self.lane), base = lane & ~(width - 1), source = lane ^ lane_mask;
    return refattn_emulation::shuffle("__shfl_xor_sync", mask, var, source >= base + width ? lane : source, width);
}
