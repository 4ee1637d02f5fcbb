"""The CUDA C emulation (refattn.backends.cuda_emulation), on small kernels of its own: CUDA C executed on the
CPU, not a GPU.

Shuffle and shared-memory semantics, the launch limits, argument checks, and
planted bugs (a divergent shuffle, a divergent barrier, a deadlock, an out-of-bounds write) that it must
report. In this process kernels run in the optimized build; test_everything_here_passes_under_the_sanitizers
runs this file again in a process with AddressSanitizer and UBSan (sanitized builds). The CuPy backend's
kernels are tested in the emulation by tests/test_cupy_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from refattn.backends import cuda_emulation as emulation

# ------------------------------------------------------------------ the emulation on small kernels

SMALL = r"""
extern "C" __global__ void shuffles(int* out) {  // 4 results per thread
    const int value = 10 * threadIdx.x;
    int* mine = out + 4 * threadIdx.x;
    mine[0] = __shfl_xor_sync(0xffffffffu, value, 1);
    mine[1] = __shfl_down_sync(0xffffffffu, value, 3, 16);
    mine[2] = __shfl_up_sync(0xffffffffu, value, 2, 8);
    mine[3] = __shfl_sync(0xffffffffu, value, 5, 16);
}

extern "C" __global__ void block_sums(const double* x, double* sums) {  // blockDim.x = 256
    __shared__ double partial[256];
    extern __shared__ double twice[];
    const unsigned t = threadIdx.x;
    partial[t] = x[blockIdx.x * blockDim.x + t];
    twice[t] = 2 * partial[t];
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) {
            partial[t] += partial[t + s];
            twice[t] += twice[t + s];
        }
        __syncthreads();
    }
    if (t == 0) {
        sums[2 * blockIdx.x] = partial[0];
        sums[2 * blockIdx.x + 1] = twice[0];
    }
}

extern "C" __global__ void touch_dynamic(unsigned char* out, unsigned long long n) {
    extern __shared__ unsigned char bytes[];
    if (threadIdx.x == 0) {
        bytes[n - 1] = 7;
        out[0] = bytes[n - 1];
    }
}

extern "C" __global__ void too_much_static(float* out) {
    __shared__ float big[12289];  // 49,156 bytes
    big[threadIdx.x] = 1.0f;
    out[threadIdx.x] = big[threadIdx.x];
}

extern "C" __global__ void static_and_dynamic(float* out) {
    __shared__ float tile[10240];  // 40 KiB
    tile[threadIdx.x] = 1.0f;
    out[threadIdx.x] = tile[threadIdx.x];
}

extern "C" __global__ void divergent_shuffle(float* out) {
    if (threadIdx.x >= 16) return;  // half the warp leaves, then a full-warp shuffle
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, out[threadIdx.x], 1);
}

extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x == 40) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void barrier_or_shuffle(float* out) {  // one warp: half shuffles, half waits at the barrier
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, out[threadIdx.x], 1);
    else __syncthreads();
}

extern "C" __global__ void arguments(double* out, long long n, int flag, double scale) {
    out[0] = scale * double(n + flag);
}
"""


@pytest.fixture(scope="module")
def small():
    return emulation.RawModule(code=SMALL, filename="small.cu")


def test_shuffles_follow_cuda_semantics(small):
    out = np.zeros((64, 4), dtype=np.int32)
    small.get_function("shuffles")((1,), (64,), (out,))
    thread = np.arange(64)
    lane, base = thread % 32, thread - thread % 32
    expected = np.stack([
        base + (lane ^ 1),
        base + np.where(lane % 16 + 3 < 16, lane + 3, lane),
        base + np.where(lane % 8 >= 2, lane - 2, lane),
        base + lane // 16 * 16 + 5,
    ], axis=1)
    np.testing.assert_array_equal(out, 10 * expected)


def test_static_and_dynamic_shared_memory_are_per_block(small):
    x = np.random.default_rng(0).standard_normal(3 * 256)
    sums = np.zeros(6)
    small.get_function("block_sums")(3, 256, (x, sums), shared_mem=256 * 8)
    expected = x.reshape(3, 256).sum(axis=1)
    np.testing.assert_allclose(sums.reshape(3, 2), np.stack([expected, 2 * expected], axis=1), rtol=1e-12)


def test_dynamic_shared_memory_above_48_kib_needs_the_opt_in(small):
    kernel = small.get_function("touch_dynamic")
    out = np.zeros(1, dtype=np.uint8)
    size = 64 * 1024
    with pytest.raises(emulation.LaunchError, match=r"touch_dynamic: shared_mem = 65536 bytes .* limit of 49152 "
                                                    r"\(raise max_dynamic_shared_size_bytes to opt in\)"):
        kernel(1, 32, (out, np.uint64(size)), shared_mem=size)
    kernel.max_dynamic_shared_size_bytes = size
    small.get_function("touch_dynamic")(1, 32, (out, np.uint64(size)), shared_mem=size)  # the attribute stays
    assert out[0] == 7
    with pytest.raises(emulation.LaunchError, match="max_dynamic_shared_size_bytes: expected 0 to 232448"):
        kernel.max_dynamic_shared_size_bytes = 228 * 1024


def test_static_shared_memory_is_limited_to_48_kib(small):
    out = np.zeros(32, dtype=np.float32)
    with pytest.raises(emulation.KernelFault, match=r"too_much_static .*static shared memory of 49156 bytes exceeds "
                                                    r"CUDA's limit of 49152"):
        small.get_function("too_much_static")(1, 32, (out,))
    kernel = small.get_function("static_and_dynamic")
    kernel(1, 32, (out,), shared_mem=8 * 1024)  # 40 + 8 KiB: exactly the limit
    with pytest.raises(emulation.KernelFault, match=r"40960 bytes plus 8196 bytes of dynamic shared memory exceed "
                                                    r"the limit of 49152"):
        kernel(1, 32, (out,), shared_mem=8 * 1024 + 4)


@pytest.mark.parametrize("grid, block, message", [
    ((2**31, 1, 1), (32, 1, 1), r"grid.x = 2147483648 is outside CUDA's range 1 to 2147483647"),
    ((1, 65536, 1), (32, 1, 1), r"grid.y = 65536 is outside CUDA's range 1 to 65535"),
    ((1, 1, 65536), (32, 1, 1), r"grid.z = 65536 is outside CUDA's range 1 to 65535"),
    ((0, 1, 1), (32, 1, 1), r"grid.x = 0 is outside"),
    ((1,), (1025,), r"block.x = 1025 is outside CUDA's range 1 to 1024"),
    ((1,), (1, 1, 65), r"block.z = 65 is outside CUDA's range 1 to 64"),
    ((1,), (32, 32, 2), r"block \(32, 32, 2\) has 2048 threads, above CUDA's limit of 1024 per block"),
    ((1, 2, 3, 4), (32,), r"grid: expected an int or a tuple of 1 to 3 ints"),
])
def test_launch_limits_are_checked(small, grid, block, message):
    with pytest.raises(emulation.LaunchError, match=message):
        small.get_function("divergent_barrier")(grid, block, (np.zeros(1, dtype=np.float32),))


def test_arguments_are_checked_against_the_parameters(small):
    kernel = small.get_function("arguments")
    out = np.zeros(1)
    kernel(1, 1, (out, 4, np.int32(1), 0.5))  # Python int and float are int64 and float64, as in CuPy
    assert out[0] == 2.5
    with pytest.raises(emulation.LaunchError, match="arguments: expected 4 arguments, got 3"):
        kernel(1, 1, (out, np.int64(4), np.int32(1)))
    with pytest.raises(emulation.LaunchError, match="argument 2: expected a int32 scalar, got int64"):
        kernel(1, 1, (out, np.int64(4), 1, 0.5))
    with pytest.raises(emulation.LaunchError, match=r"argument 0 points to 8-byte elements, got an array of float32"):
        kernel(1, 1, (out.astype(np.float32), np.int64(4), np.int32(1), 0.5))
    with pytest.raises(emulation.LaunchError, match="argument 0 is a pointer: expected a NumPy array, got list"):
        kernel(1, 1, ([0.0], np.int64(4), np.int32(1), 0.5))


@pytest.mark.parametrize("kernel, block, message", [
    ("divergent_shuffle", 32, r"block \(0, 0, 0\) thread \(\d+, 0, 0\): (__shfl_xor_sync\(mask 0xffffffff\) "
                              r"reached after lanes 0x[0-9a-f]+ of the warp returned|returned while lanes of its warp "
                              r"wait in __shfl_xor_sync\(mask 0xffffffff\)): a divergent shuffle"),
    ("divergent_barrier", 64, r"(__syncthreads\(\) reached after 1 thread|returned while \d+ thread\(s\) wait at "
                              r"__syncthreads).*divergent barrier"),
    ("barrier_or_shuffle", 32, r"deadlock: every live thread waits \(16 at __syncthreads, 16 in warp shuffles, "
                               r"0 returned\)"),
])
def test_divergent_barriers_and_shuffles_are_reported(small, kernel, block, message):
    out = np.zeros(64, dtype=np.float32)
    with pytest.raises(emulation.KernelFault, match=message):
        small.get_function(kernel)(1, block, (out,))


OUT_OF_BOUNDS = """
    import numpy as np
    from refattn.backends import cuda_emulation as emulation
    code = '''
    extern "C" __global__ void write_past_the_end(float* out) {
        out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;  // no bounds check: the last block overruns
    }'''
    out = np.zeros(40, dtype=np.float32)
    emulation.RawModule(code=code, filename="planted.cu").get_function("write_past_the_end")(2, 32, (out,))
    print("no error reported")
"""


def test_sanitizers_report_an_out_of_bounds_write():
    environment = {**os.environ, **emulation.sanitizer_environment()}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(OUT_OF_BOUNDS)], capture_output=True, text=True,
                            env=environment, timeout=600)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
    assert "WRITE of size 4" in result.stderr and "write_past_the_end" in result.stderr, result.stderr[-3000:]
    assert "no error reported" not in result.stdout


# Everything except the tests that start processes of their own or only exercise the Python side of builds.
SANITIZED_RUN = "not sanitizers and not cached and not compile_errors"


def test_everything_here_passes_under_the_sanitizers():
    environment = {**os.environ, **emulation.sanitizer_environment()}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "--capture=sys",
               "-k", SANITIZED_RUN]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


# ------------------------------------------------------------------ builds, cache, switches


def test_builds_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("REFATTN_CACHE_DIR", str(tmp_path))
    code = 'extern "C" __global__ void one(int* out) { out[threadIdx.x] = 1; }'
    out = np.zeros(2, dtype=np.int32)
    emulation.RawModule(code=code).get_function("one")(1, 2, (out,))
    built = list((tmp_path / "cuda-emulation").glob("*.so"))
    assert len(built) == 1 and out.tolist() == [1, 1]
    stamp = built[0].stat().st_mtime_ns
    emulation.RawModule(code=code).get_function("one")(1, 1, (out,))
    assert list((tmp_path / "cuda-emulation").glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    emulation.RawModule(code=code + "\n").get_function("one")(1, 1, (out,))
    assert len(list((tmp_path / "cuda-emulation").glob("*.so"))) == 2


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REFATTN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert emulation.cache_directory() == tmp_path / "refattn" / "cuda-emulation"
    monkeypatch.setenv("REFATTN_CACHE_DIR", str(tmp_path / "mine"))
    assert emulation.cache_directory() == tmp_path / "mine" / "cuda-emulation"


def test_compile_errors_show_the_compiler_log():
    module = emulation.RawModule(code='extern "C" __global__ void broken(int* out) { out[0] = undeclared; }',
                                 filename="broken.cu")
    with pytest.raises(emulation.CompileError, match=r"broken.cu:1:.*'undeclared' was not declared"):
        module.compile()


def test_the_switch_accepts_only_0_and_1(monkeypatch):
    monkeypatch.setenv(emulation.ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match=r"REFATTN_CUDA_EMULATION: expected 0 or 1, got 'yes'"):
        emulation.enabled()
    for value, expected in (("0", False), ("", False), ("1", True)):
        monkeypatch.setenv(emulation.ENVIRONMENT_VARIABLE, value)
        assert emulation.enabled() is expected
