"""Timing, peak memory and machine description.

Timing: ``time.perf_counter`` around a callable that synchronises its device itself (so the
numbers are completion times, not launch times), after warm-up calls; median and IQR reported.

Peak memory is the allocator-level high-water mark of one call *above* what was allocated before
it (so the inputs are excluded), measured in a separate, untimed call:

- NumPy (and anything that allocates through NumPy): ``tracemalloc`` (NumPy reports its data
  buffers to it);
- torch on the CPU: the profiler's memory events (``profile_memory=True``): every allocation and
  free of the CPU allocator, summed in time order (RSS deltas would miss memory the C allocator
  keeps and reuses);
- torch on CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- CuPy: the default memory pool's ``total_bytes`` after ``free_all_blocks`` (the pool's high-water
  mark of the call, rounded to its blocks).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any


def time_calls(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
               max_seconds: float | None = None) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones.

    With ``max_seconds``, stops early (after at least one timed call) once the timed calls have used
    that much time: long cases at large L then cost a bounded budget.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    for _ in range(max(1, repeats)):
        gc.collect()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
        if max_seconds is not None and total >= max_seconds:
            break
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """median, IQR (q3 − q1), min and max of ``times`` in seconds."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_s": statistics.median(ordered), "iqr_s": q3 - q1, "min_s": ordered[0], "max_s": ordered[-1],
            "rounds": len(ordered)}


def peak_numpy(fn: Callable[[], Any]) -> int:
    """Bytes: tracemalloc's peak during ``fn()`` minus what was traced before it."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - before)


def peak_torch_cpu(fn: Callable[[], Any]) -> int:
    """Bytes: the running sum of the CPU allocator's events (profiler, ``profile_memory=True``)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_torch_cuda(fn: Callable[[], Any], device: Any = None) -> int:
    """Bytes: ``max_memory_allocated`` during ``fn()`` minus ``memory_allocated`` before it."""
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def peak_cupy(fn: Callable[[], Any]) -> int:
    """Bytes: growth of CuPy's default pool over ``fn()`` after freeing its cached blocks."""
    import cupy

    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.used_bytes()
    fn()
    cupy.cuda.Device().synchronize()
    return max(0, pool.total_bytes() - before)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, Python/NumPy/torch versions, and CUDA device when present."""
    import numpy as np

    info: dict[str, Any] = {
        "node": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            total_kib = int(handle.readline().split()[1])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    return info
