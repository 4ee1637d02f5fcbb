"""Timing, peak memory and machine description.

Timing: ``time.perf_counter`` around a callable that synchronises its device itself (so the
numbers are completion times, not launch times), after warm-up calls; median and IQR reported.

Peak memory is the allocator-level high-water mark of one call *above* what was allocated before
it (so the inputs are excluded), measured in a separate, untimed call:

- NumPy (and anything that allocates through NumPy): ``tracemalloc`` (NumPy reports its data
  buffers to it);
- torch on the CPU: the profiler's memory events (``profile_memory=True``): every allocation and
  free of torch's CPU allocator during the call, summed in time order, so the peak is exact to the
  byte (RSS deltas would miss memory the C allocator keeps and reuses, and count pages, not bytes).
  Blocks allocated before the call (the inputs, a previous call's gradients) are not counted, and
  freeing them does not lower the sum. The profiler's own lines on stderr (``USDT: ...
  profiler_start``, ``CPUAllocator.cpp ... Memory block of unknown size``) are swallowed; anything
  else it writes there is passed on (:func:`peak_torch_cpu`);
- torch on CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- CuPy: the default memory pool's ``total_bytes`` after ``free_all_blocks`` (the pool's high-water
  mark of the call, rounded to its blocks).

Guards for long sequences: :func:`available_bytes` (the kernel's MemAvailable), and
:func:`address_space_limit`, which caps the process's address space while a case runs so that a
case that outgrows the memory fails with ``MemoryError`` / torch's "can't allocate memory" instead
of swapping or waking the OOM killer.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import glob
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

PROFILER_NOISE = (
    re.compile(r"^USDT:.*profiler_(start|stop)\s*$"),
    re.compile(r"CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started"),
)
"""Lines torch's profiler writes to stderr on every session (native code, so no Python switch silences them)."""


def timed_call(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call of ``fn`` by ``clock``, after a garbage collection (so that none falls inside it)."""
    gc.collect()
    start = clock()
    fn()
    return clock() - start


def time_calls(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
               max_seconds: float | None = None) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones.

    With ``max_seconds``, stops early (after at least one timed call) once the timed calls have used
    that much time: long cases at large L then cost a bounded budget.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an integer >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    for _ in range(repeats):
        elapsed = timed_call(fn)
        times.append(elapsed)
        total += elapsed
        if max_seconds is not None and total >= max_seconds:
            break
    return times


def interleaved_times(calls: Sequence[Callable[[], Any]], pairs: int,
                      clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds of each of ``calls`` over ``pairs`` rounds that call each once, in order (a, b, a, b, ...: the
    sides see the same load), after one untimed call of each (caches, lazy initialisation, the allocator's
    first pages); a garbage collection before every timed call. The rule of the performance targets."""
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs: expected an integer >= 1, got {pairs!r}")
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(pairs):
        for call, collected in zip(calls, times, strict=True):
            collected.append(timed_call(call, clock))
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


@contextlib.contextmanager
def native_stderr_filtered(noise: tuple[re.Pattern[str], ...]) -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there, past ``sys.stderr``) for the duration;
    afterwards pass on every captured line that matches none of ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            captured = capture.read().decode(errors="replace")
    for line in captured.splitlines(keepends=True):
        if not any(pattern.search(line) for pattern in noise):
            sys.stderr.write(line)


def peak_torch_cpu(fn: Callable[[], Any]) -> int:
    """Bytes: the highest running sum of torch's CPU allocator events during ``fn()`` (allocations
    positive, frees negative, in time order), from the profiler (``profile_memory=True``), silently."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with native_stderr_filtered(PROFILER_NOISE):
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


def _proc_bytes(path: str, field: str) -> int | None:
    """The ``field:`` line of a /proc file that counts kB, in bytes; None where it does not say."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int | None:
    """The memory the kernel can give without swapping (``MemAvailable``), None where it does not say."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _address_space() -> int | None:
    return _proc_bytes("/proc/self/status", "VmSize")


@contextlib.contextmanager
def address_space_limit(extra_bytes: int | None) -> Iterator[None]:
    """Within the context, the process may map at most ``extra_bytes`` more than it has mapped now
    (``RLIMIT_AS``): an allocation beyond fails cleanly (``MemoryError``, torch's ``RuntimeError``
    "can't allocate memory") instead of pushing the machine into swap or the OOM killer. A no-op
    where the limit cannot be read or set, when ``extra_bytes`` is None, and on a machine with NVIDIA
    devices (a CUDA context reserves far more address space than memory: the limit would break it)."""
    mapped = _address_space()
    if extra_bytes is None or mapped is None or nvidia_devices():
        yield
        return
    import resource  # POSIX only; /proc/self/status (read above) exists on Linux only anyway

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + max(0, extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def nvidia_devices() -> list[str]:
    """The NVIDIA device files of this machine (``/dev/nvidia0``, ...): empty where no CUDA context can exist."""
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (NumPy's MemoryError, torch's "can't allocate memory")."""
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "out of memory" in str(error)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, None where the system has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters since boot, in ticks: user, nice, system, idle, iowait, irq, softirq
    and steal (the "cpu" line of /proc/stat); None where there is none."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return [int(value) for value in fields[1:9]]


def stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time between two :func:`cpu_ticks` readings that the hypervisor gave to other
    machines (steal over all ticks): a virtual machine's timings are slower by about 1 / (1 - share)."""
    if before is None or after is None:
        return None
    deltas = [late - early for early, late in zip(before, after, strict=True)]
    return deltas[7] / sum(deltas) if sum(deltas) > 0 else None


def machine_info() -> dict[str, Any]:
    """Date, CPU, cores, memory, load, Python/NumPy/torch versions and threads, CUDA device when present."""
    import numpy as np

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "node": platform.node(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    load = load_average()
    if load is not None:
        info["load_average"] = load
    for key, field in (("memory_gib", "MemTotal"), ("memory_available_gib", "MemAvailable")):
        found = _proc_bytes("/proc/meminfo", field)
        if found is not None:
            info[key] = round(found / 2**30, 1)
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


def describe(machine: dict[str, Any]) -> str:
    """One line: the machine of :func:`machine_info`."""
    text = (f"{machine.get('date', '?')} on {machine['cpu']}, {machine['cpu_count']} CPUs, "
            f"{machine.get('memory_gib', '?')} GiB ({machine.get('memory_available_gib', '?')} GiB available), "
            f"load average {machine.get('load_average', '?')}")
    if "torch" in machine:
        text += f"; torch {machine['torch']} with {machine['torch_threads']} threads"
    if "cuda_device" in machine:
        text += f"; CUDA device {machine['cuda_device']} (CUDA {machine['cuda_version']})"
    return text
