"""The performance targets (speed and memory ratios between two cases), measured with the same cases as the sweep.

Each target times two cases (median of ``repeats`` after warm-up), measures their peak memory and
states the ratio against its threshold. CPU figures only unless a device is asked for explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import cases, measure


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    numerator: tuple[str, str, str, cases.Shape]  # (backend, algorithm, direction, shape): the slow side
    denominator: tuple[str, str, str, cases.Shape]  # the fast side
    min_time_ratio: float | None = None  # numerator time / denominator time >= this
    max_time_ratio: float | None = None  # numerator time / denominator time <= this
    max_memory_ratio: float | None = None  # denominator peak / numerator peak <= this (< when strict)
    strict_memory: bool = False


def _shape(length: int, **kw: Any) -> cases.Shape:
    return cases.Shape(batch=1, heads=8, length=length, dim=64, **kw)


TARGETS = (
    Target("fsat-vs-dense", "FSAT torch fwd+bwd, L=16384 B=1 H=8 D=64 K=16: >= 20x faster than dense SDPA, peak < 1/10",
           ("torch", "dense", "fwdbwd", _shape(16384)), ("torch", "fsat", "fwdbwd", _shape(16384, top_k=16)),
           min_time_ratio=20.0, max_memory_ratio=0.1, strict_memory=True),
    Target("fsat-scaling", "FSAT torch fwd+bwd: time(L=65536) / time(L=16384) <= 6 (L log L ~ 4.6, L^2 = 16)",
           ("torch", "fsat", "fwdbwd", _shape(65536, top_k=16)), ("torch", "fsat", "fwdbwd", _shape(16384, top_k=16)),
           max_time_ratio=6.0),
    Target("routing-vs-lucidrains", "routing torch fwd+bwd, L=4096 B=1 H=8 D=64 C=64 W=64: >= 1.5x faster than "
           "lucidrains KmeansAttention, no more peak memory",
           ("lucidrains", "routing", "fwdbwd", _shape(4096, clusters=64, window=64)),
           ("torch", "routing", "fwdbwd", _shape(4096, clusters=64, window=64)),
           min_time_ratio=1.5, max_memory_ratio=1.0),
    Target("numpy-vs-torch-fsat", "NumPy reference FSAT fwd, L=65536 D=64 K=16 (B=1 H=8): within 5x of torch fwd",
           ("numpy", "fsat", "fwd", _shape(65536, top_k=16)), ("torch", "fsat", "fwd", _shape(65536, top_k=16)),
           max_time_ratio=5.0),
)


def _build(side: tuple[str, str, str, cases.Shape], dtype: str, device: str | None) -> cases.Case | dict[str, Any]:
    backend, algorithm, direction, shape = side
    try:
        return cases.build_case(backend, algorithm, direction, dtype, shape, device=device, dense_max_gflop=1e9)
    except cases.Unsupported as error:
        return {"backend": backend, "algorithm": algorithm, "status": "skipped", "reason": str(error)}


def _interleaved(a: cases.Case, b: cases.Case, repeats: int) -> tuple[list[float], list[float]]:
    """Warm both up, then alternate timed calls a, b, a, b, ...: on a shared machine both sides
    see the same background load."""
    a.fn()
    b.fn()
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(max(1, repeats)):
        times_a += measure.time_calls(a.fn, repeats=1, warmup=0)
        times_b += measure.time_calls(b.fn, repeats=1, warmup=0)
    return times_a, times_b


def _record(case: cases.Case, times: list[float], memory: bool) -> dict[str, Any]:
    result = {**case.info, **measure.summarize(times), "times_s": times, "status": "ok"}
    if memory:
        result["peak_bytes"], result["memory_method"] = case.peak_memory()
    return result


def run(dtype: str = "float32", repeats: int = 3, device: str | None = "cpu", names: list[str] | None = None,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every target (or those in ``names``); returns one record per target."""
    records = []
    for target in TARGETS:
        if names and target.name not in names:
            continue
        log(f"target {target.name}: {target.description} (load average {os.getloadavg()[0]:.2f})")
        memory = target.max_memory_ratio is not None
        slow_case, fast_case = _build(target.numerator, dtype, device), _build(target.denominator, dtype, device)
        record: dict[str, Any] = {"target": target.name, "description": target.description, "dtype": dtype,
                                  "load_average_start": list(os.getloadavg())}
        if isinstance(slow_case, dict) or isinstance(fast_case, dict):
            sides = [side for side in (slow_case, fast_case) if isinstance(side, dict)]
            record["verdict"] = "not measured: " + "; ".join(side["reason"] for side in sides)
            log(format_record(record))
            records.append(record)
            continue
        slow_times, fast_times = _interleaved(slow_case, fast_case, repeats)
        slow, fast = _record(slow_case, slow_times, memory), _record(fast_case, fast_times, memory)
        del slow_case, fast_case
        record.update(numerator=slow, denominator=fast, load_average_end=list(os.getloadavg()))
        ratio = slow["median_s"] / fast["median_s"]
        spread = (slow["min_s"] / fast["max_s"], slow["max_s"] / fast["min_s"])
        record.update(time_ratio=ratio, time_ratio_range=spread)
        met = True
        if target.min_time_ratio is not None:
            met &= ratio >= target.min_time_ratio
        if target.max_time_ratio is not None:
            met &= ratio <= target.max_time_ratio
        if memory and slow.get("peak_bytes"):
            memory_ratio = fast["peak_bytes"] / slow["peak_bytes"]
            record["memory_ratio"] = memory_ratio
            limit = target.max_memory_ratio
            met &= memory_ratio < limit if target.strict_memory else memory_ratio <= limit
        record["verdict"] = "met" if met else "NOT met"
        log(format_record(record))
        records.append(record)
    return records


def format_record(record: dict[str, Any]) -> str:
    if "time_ratio" not in record:
        return f"  {record['target']}: {record['verdict']}"
    slow, fast = record["numerator"], record["denominator"]
    low, high = record["time_ratio_range"]
    text = (f"  {record['target']}: {slow['backend']}/{slow['algorithm']} L={slow['length']} "
            f"{slow['median_s'] * 1e3:.1f} ms vs {fast['backend']}/{fast['algorithm']} L={fast['length']} "
            f"{fast['median_s'] * 1e3:.1f} ms: ratio {record['time_ratio']:.2f} (range {low:.2f}-{high:.2f})")
    if "memory_ratio" in record:
        text += (f"; peak {fast['peak_bytes'] / 2**20:.1f} MiB vs {slow['peak_bytes'] / 2**20:.1f} MiB "
                 f"(ratio {record['memory_ratio']:.3f})")
    return text + f" -> {record['verdict']}"
