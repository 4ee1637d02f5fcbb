"""The performance targets and the rule that judges them (``refattn bench --targets``).

The rule (the project's standard for performance claims): the sides of a target are measured in one process,
a fresh one per target (what ran before does not shape it: a process that had run FSAT at a million tokens
then ran routing at L = 4,096 1.7x slower), interleaved (a, b, a, b, ... after one untimed call of each, so
both see the same load), for at least :data:`MIN_REPEATS` pairs; each side's median and range are reported,
and the ratio's median and range over the per-pair ratios; a target is **met** only when that median meets
the threshold. Memory is allocator-exact (:func:`refattn.bench.measure.peak_torch_cpu` on the CPU), so one
call per side measures it. The machine, date, load average before and after every target, the share of CPU
time the hypervisor stole while it ran (a virtual machine's noisy neighbours), and torch's threads are
recorded next to the numbers.

Kinds of target (:class:`Target`.kind):

- ``"time ratio"``: time(sides[0]) / time(sides[1]) per pair, e.g. SDPA / FSAT >= 50;
- ``"time"``: the median seconds of one side, e.g. <= 30 s;
- ``"memory / retained"``: the peak above the inputs over what FSAT's forward + backward cannot avoid
  holding (output + gradients + saved probabilities, :func:`refattn.bench.models.fsat_retained_bytes`);
- ``"memory ratio"``: peak(sides[0]) / peak(sides[1]), e.g. ours / lucidrains <= 1;
- ``"memory total"``: inputs + peak above them, in bytes, e.g. within 24 GiB.

CPU targets (``--device cpu``, the default) are issue 13's, on the torch backend, float32, B = 1,
H = 8, D = 64; GPU targets (``--device cuda``) are the device check's (issue 11 E), bfloat16 where
the backend has it. Before a case is built its inputs, output and gradients are compared with the
memory available, and while a target runs the process may map no more than was available when it
started (:func:`refattn.bench.measure.address_space_limit`): a case that cannot fit is reported
"not measured" with the reason, never crashes the machine.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import cases, measure, models

MIN_REPEATS = 7
"""Interleaved pairs (or calls, for a one-sided time target) below which a verdict is not allowed."""

KINDS = ("time ratio", "time", "memory / retained", "memory ratio", "memory total")


@dataclass(frozen=True)
class Side:
    """One measured case of a target."""

    backend: str
    algorithm: str
    direction: str
    shape: cases.Shape
    dtype: str
    sdpa: str | None = None  # the dense baseline's kernel on torch ("flash" on the GPU); None: torch's choice

    def label(self) -> str:
        shape = self.shape
        text = (f"{self.backend} {self.algorithm} {self.direction} {self.dtype} B={shape.batch} H={shape.heads} "
                f"L={shape.length} D={shape.dim}")
        if self.algorithm == "fsat":
            text += f" K={shape.top_k}"
        elif self.algorithm == "routing":
            text += f" C={shape.num_clusters} W={shape.window_size}"
        elif self.sdpa:
            text += f" ({self.sdpa})"
        return text


@dataclass(frozen=True)
class Target:
    """A claim, its sides, and the threshold its value must meet (``at_most``: value <= threshold)."""

    name: str
    claim: str
    kind: str
    sides: tuple[Side, ...]
    threshold: float
    at_most: bool
    device: str = "cpu"
    value_label: str = ""  # what the value is, e.g. "SDPA time / FSAT time"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.sides) != (2 if self.kind in ("time ratio", "memory ratio") else 1):
            raise ValueError(f"target {self.name}: a {self.kind!r} target has "
                             f"{2 if 'ratio' in self.kind else 1} side(s), got {len(self.sides)}")


def _shape(length: int, batch: int = 1, **parameters: Any) -> cases.Shape:
    return cases.Shape(batch=batch, heads=8, length=length, dim=64, **parameters)


def _fsat(length: int, direction: str = "fwdbwd", *, batch: int = 1, dtype: str = "float32",
          backend: str = "torch") -> Side:
    return Side(backend, "fsat", direction, _shape(length, batch, top_k=16), dtype)


def _sdpa(length: int, direction: str = "fwdbwd", *, batch: int = 1, dtype: str = "float32",
          kernel: str | None = None) -> Side:
    return Side("torch", "dense", direction, _shape(length, batch), dtype, sdpa=kernel)


def _routing(backend: str, length: int, clusters: int, dtype: str = "float32") -> Side:
    return Side(backend, "routing", "fwdbwd", _shape(length, clusters=clusters, window=clusters), dtype)


MILLION, TWO_MILLION = 2**20, 2**21

CPU_TARGETS = (
    Target("fsat-time-1m", "FSAT fwd+bwd at L = 1,048,576, K = 16 takes at most 30 s", "time",
           (_fsat(MILLION),), 30.0, at_most=True, value_label="seconds per fwd+bwd"),
    Target("fsat-memory-1m", "FSAT fwd+bwd at L = 1,048,576: peak memory above the inputs at most 1.5x the output + "
           "gradients + saved probabilities", "memory / retained", (_fsat(MILLION),), 1.5, at_most=True,
           value_label="peak above inputs / retained"),
    Target("fsat-forward-memory-2m", "FSAT forward alone (no autograd) at L = 2,097,152 runs within the machine's "
           "24 GiB (inputs + peak above them)", "memory total", (_fsat(TWO_MILLION, "fwd"),), 24.0 * 2**30,
           at_most=True, value_label="inputs + peak"),
    Target("fsat-vs-sdpa-16k", "FSAT fwd+bwd at L = 16,384, K = 16 at least 50x faster than SDPA", "time ratio",
           (_sdpa(16384), _fsat(16384)), 50.0, at_most=False, value_label="SDPA time / FSAT time"),
    Target("fsat-scaling-64k", "FSAT fwd+bwd time(L = 65,536) / time(L = 16,384) at most 4.5 (L log L: 4.6, L^2: 16)",
           "time ratio", (_fsat(65536), _fsat(16384)), 4.5, at_most=True, value_label="time(65,536) / time(16,384)"),
    Target("fsat-vs-sdpa-forward-1k", "FSAT forward at L = 1,024, B = 16 no slower than SDPA", "time ratio",
           (_sdpa(1024, "fwd", batch=16), _fsat(1024, "fwd", batch=16)), 1.0, at_most=False,
           value_label="SDPA time / FSAT time"),
    Target("routing-vs-lucidrains-4k", "routing fwd+bwd at L = 4,096, C = W = 64 at least 2x faster than lucidrains",
           "time ratio", (_routing("lucidrains", 4096, 64), _routing("torch", 4096, 64)), 2.0, at_most=False,
           value_label="lucidrains time / torch time"),
    Target("routing-memory-4k", "routing fwd+bwd at L = 4,096, C = W = 64: no more peak memory than lucidrains",
           "memory ratio", (_routing("torch", 4096, 64), _routing("lucidrains", 4096, 64)), 1.0, at_most=True,
           value_label="torch peak / lucidrains peak"),
    Target("routing-vs-lucidrains-16k", "routing fwd+bwd at L = 16,384, C = W = 128 at least 2x faster than "
           "lucidrains", "time ratio", (_routing("lucidrains", 16384, 128), _routing("torch", 16384, 128)), 2.0,
           at_most=False, value_label="lucidrains time / torch time"),
    Target("routing-memory-16k", "routing fwd+bwd at L = 16,384, C = W = 128: no more peak memory than lucidrains",
           "memory ratio", (_routing("torch", 16384, 128), _routing("lucidrains", 16384, 128)), 1.0, at_most=True,
           value_label="torch peak / lucidrains peak"),
    Target("fsat-memory-16k", "FSAT fwd+bwd at L = 16,384: peak memory above the inputs at most 1.5x the output + "
           "gradients + saved probabilities", "memory / retained", (_fsat(16384),), 1.5, at_most=True,
           value_label="peak above inputs / retained"),
    Target("fsat-memory-64k", "FSAT fwd+bwd at L = 65,536: peak memory above the inputs at most 1.5x the output + "
           "gradients + saved probabilities", "memory / retained", (_fsat(65536),), 1.5, at_most=True,
           value_label="peak above inputs / retained"),
)

GPU_TARGETS = (
    Target("gpu-fsat-vs-flash-64k", "FSAT torch fwd+bwd at L = 65,536, K = 16, bfloat16, at least 10x faster than "
           "SDPA's FlashAttention kernel", "time ratio",
           (_sdpa(65536, dtype="bfloat16", kernel="flash"), _fsat(65536, dtype="bfloat16")), 10.0, at_most=False,
           device="cuda", value_label="flash time / FSAT time"),
    Target("gpu-cupy-fsat-64k", "CuPy FSAT fwd+bwd at L = 65,536 within 2x of torch (float16 on both sides: CuPy has "
           "no bfloat16)", "time ratio",
           (_fsat(65536, dtype="float16", backend="cupy"), _fsat(65536, dtype="float16")), 2.0, at_most=True,
           device="cuda", value_label="CuPy time / torch time"),
    Target("gpu-numba-fsat-64k", "Numba-CUDA FSAT fwd+bwd at L = 65,536 within 2x of torch (float32 on both sides: "
           "Numba-CUDA computes in float32 or float64)", "time ratio",
           (_fsat(65536, backend="numba_cuda"), _fsat(65536)), 2.0, at_most=True,
           device="cuda", value_label="Numba-CUDA time / torch time"),
    Target("gpu-routing-vs-lucidrains-16k", "routing torch fwd+bwd at L = 16,384, C = W = 128, bfloat16, at least 2x "
           "faster than lucidrains", "time ratio",
           (_routing("lucidrains", 16384, 128, "bfloat16"), _routing("torch", 16384, 128, "bfloat16")), 2.0,
           at_most=False, device="cuda", value_label="lucidrains time / torch time"),
)

TARGETS = CPU_TARGETS + GPU_TARGETS


def for_device(device: str) -> tuple[Target, ...]:
    """The targets measured with ``--device device`` (``cpu``; ``cuda`` or ``cuda:N``)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return tuple(target for target in TARGETS if target.device == kind)


class NotMeasured(Exception):
    """A target that cannot be measured here; ``str(error)`` says why."""


Builder = Callable[[Side], cases.Case]


def check_repeats(repeats: int) -> int:
    """``repeats`` if a verdict may rest on it (at least :data:`MIN_REPEATS`), else ``ValueError``."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < MIN_REPEATS:
        raise ValueError(f"repeats: a target needs at least {MIN_REPEATS} interleaved pairs, got {repeats!r}")
    return repeats


def case_builder(device: str) -> Builder:
    """Build a side's case on ``device`` after checking that its inputs, output and gradients fit."""

    def build(side: Side) -> cases.Case:
        return cases.build_case(side.backend, side.algorithm, side.direction, side.dtype, side.shape,
                                device=device, dense_max_gflop=float("inf"), dense_max_bytes=float("inf"),
                                memory_available=measure.available_bytes(), sdpa=side.sdpa)

    return build


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_target(target: Target, build: Builder, repeats: int = MIN_REPEATS,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Measure one target by the rule; the record (also when it cannot be measured: ``verdict`` says why)."""
    check_repeats(repeats)
    record: dict[str, Any] = {"target": target.name, "claim": target.claim, "kind": target.kind,
                              "device": target.device, "threshold": target.threshold,
                              "comparison": "<=" if target.at_most else ">=", "value_label": target.value_label,
                              "load_average_before": measure.load_average(),
                              "memory_available_bytes": measure.available_bytes()}
    ticks = measure.cpu_ticks()
    try:
        built = [build(side) for side in target.sides]
        sides = [{"label": side.label(), **case.info} for side, case in zip(target.sides, built, strict=True)]
        record["sides"] = sides
        if target.kind in ("time ratio", "time"):
            _measure_times(built, sides, repeats, clock)
        else:
            _measure_memory(target, built, sides)
        del built
    except cases.Unsupported as error:
        record["verdict"] = f"not measured: {error}"
    except NotMeasured as error:
        record["verdict"] = f"not measured: {error}"
    except Exception as error:  # noqa: BLE001 - recorded with its message, never as a number
        if measure.out_of_memory(error):
            available = record["memory_available_bytes"]
            where = f"the {available / 2**30:.1f} GiB available" if available is not None else "memory"
            record["verdict"] = f"not measured: ran out of {where} ({type(error).__name__}: {error})"
        else:
            record["verdict"] = f"error: {type(error).__name__}: {error}"
    else:
        _judge(target, record)
    gc.collect()
    record["load_average_after"] = measure.load_average()
    record["cpu_stolen"] = measure.stolen_share(ticks, measure.cpu_ticks())
    return record


def _measure_times(built: list[cases.Case], sides: list[dict[str, Any]], repeats: int,
                   clock: Callable[[], float]) -> None:
    times = measure.interleaved_times([case.fn for case in built], repeats, clock)
    for side, collected in zip(sides, times, strict=True):
        side["times_s"] = collected
        side.update({f"{key}_s": value for key, value in _summary(collected).items()})


def _measure_memory(target: Target, built: list[cases.Case], sides: list[dict[str, Any]]) -> None:
    for case, side in zip(built, sides, strict=True):
        peak, method = case.peak_memory()
        if peak is None:
            raise NotMeasured(f"{side['label']}: peak memory {method}")
        side.update(peak_bytes=peak, memory_method=method)


def _judge(target: Target, record: dict[str, Any]) -> None:
    sides = record["sides"]
    if target.kind == "time ratio":
        ratios = [a / b for a, b in zip(sides[0]["times_s"], sides[1]["times_s"], strict=True)]
        record["ratios"] = ratios
        summary = _summary(ratios)
        record.update(value=summary["median"], range=[summary["min"], summary["max"]], pairs=len(ratios))
    elif target.kind == "time":
        record.update(value=sides[0]["median_s"], range=[sides[0]["min_s"], sides[0]["max_s"]],
                      calls=len(sides[0]["times_s"]))
    elif target.kind == "memory / retained":
        side = sides[0]
        retained = models.fsat_retained_bytes(side["batch"], side["heads"], side["length"], side["dim"],
                                              side["top_k"], itemsize=models.ITEMSIZE[side["dtype"]])
        record["retained_bytes"] = retained
        record["value"] = side["peak_bytes"] / retained["total"]
    elif target.kind == "memory ratio":
        record["value"] = sides[0]["peak_bytes"] / sides[1]["peak_bytes"]
    else:
        record["value"] = sides[0]["input_bytes"] + sides[0]["peak_bytes"]
    value = record["value"]
    met = value <= target.threshold if target.at_most else value >= target.threshold
    record["verdict"] = "met" if met else "NOT met"


def run(targets: Sequence[Target], *, repeats: int = MIN_REPEATS, build: Builder | None = None, device: str = "cpu",
        log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """Measure ``targets`` one after another, each under the memory guard; print each as it ends.

    Without ``build``, each target runs in a fresh process (spawned) on the cases of :func:`case_builder`
    for ``device`` (the rule above); with ``build`` (e.g. fake cases), every target runs in this process.
    """
    check_repeats(repeats)
    records = []
    for target in targets:
        log(f"[{target.name}] {target.claim}")
        if build is None:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                record = pool.submit(_measure_in_fresh_process, target, device, repeats).result()
        else:
            record = _measure_guarded(target, build, repeats, clock)
        log(format_record(record))
        records.append(record)
    return records


def _measure_guarded(target: Target, build: Builder, repeats: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """:func:`measure_target` under the memory guard."""
    with measure.address_space_limit(measure.available_bytes()):
        return measure_target(target, build, repeats, clock)


def _measure_in_fresh_process(target: Target, device: str, repeats: int) -> dict[str, Any]:
    """The guarded measurement on the cases of :func:`case_builder` for ``device``; the record says which
    process measured it (``process``: its id)."""
    return {**_measure_guarded(target, case_builder(device), repeats), "process": os.getpid()}


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def format_record(record: dict[str, Any]) -> str:
    """The lines ``refattn bench --targets`` prints for one target."""
    lines = []
    for side in record.get("sides", ()):
        text = f"  {side['label']}:"
        if "times_s" in side:
            text += (f" median {_seconds(side['median_s'])}, range {_seconds(side['min_s'])} to "
                     f"{_seconds(side['max_s'])} ({len(side['times_s'])} calls)")
        if "peak_bytes" in side:
            text += f" peak {_mib(side['peak_bytes'])} above the inputs ({_mib(side['input_bytes'])})"
        lines.append(text)
    threshold = _threshold_text(record)
    if "value" not in record:
        lines.append(f"  -> {record['verdict']}")
    elif record["kind"] == "time ratio":
        low, high = record["range"]
        lines.append(f"  {record['value_label']}, {record['pairs']} interleaved pairs: median {record['value']:.2f}, "
                     f"range {low:.2f} to {high:.2f}; target {threshold} -> {record['verdict']}")
    elif record["kind"] == "time":
        low, high = record["range"]
        lines.append(f"  {record['calls']} calls: median {_seconds(record['value'])}, range {_seconds(low)} to "
                     f"{_seconds(high)}; target {threshold} -> {record['verdict']}")
    elif record["kind"] == "memory / retained":
        parts = record["retained_bytes"]
        lines.append(f"  retained = output {_mib(parts['output'])} + gradients {_mib(parts['gradients'])} + saved "
                     f"probabilities {_mib(parts['probabilities'])} = {_mib(parts['total'])}; peak / retained "
                     f"{record['value']:.2f}; target {threshold} -> {record['verdict']}")
    elif record["kind"] == "memory ratio":
        lines.append(f"  {record['value_label']}: {record['value']:.3f}; target {threshold} -> {record['verdict']}")
    else:
        lines.append(f"  {record['value_label']}: {record['value'] / 2**30:.2f} GiB; target {threshold} -> "
                     f"{record['verdict']}")
    stolen = record.get("cpu_stolen")
    lines.append(f"  load average {record['load_average_before']} before, {record['load_average_after']} after"
                 + ("" if stolen is None else f"; CPU time stolen by the hypervisor: {stolen:.0%}"))
    return "\n".join(lines)


def _threshold_text(record: dict[str, Any]) -> str:
    if record["kind"] == "time":
        return f"{record['comparison']} {record['threshold']:g} s"
    if record["kind"] == "memory total":
        return f"{record['comparison']} {record['threshold'] / 2**30:g} GiB"
    return f"{record['comparison']} {record['threshold']:g}"


def table(records: Sequence[dict[str, Any]]) -> str:
    """One row per target: value (median) and range, threshold, verdict."""
    header = f"{'target':<28} {'measured (median, range)':<34} {'threshold':<11} verdict"
    lines = [header, "-" * len(header)]
    for record in records:
        if "value" not in record:
            measured = "—"
        elif record["kind"] == "time ratio":
            measured = f"{record['value']:.2f} ({record['range'][0]:.2f}-{record['range'][1]:.2f})"
        elif record["kind"] == "time":
            measured = f"{record['value']:.2f} s ({record['range'][0]:.2f}-{record['range'][1]:.2f} s)"
        elif record["kind"] == "memory total":
            measured = f"{record['value'] / 2**30:.2f} GiB"
        else:
            measured = f"{record['value']:.3f}"
        lines.append(f"{record['target']:<28} {measured:<34} {_threshold_text(record):<11} {record['verdict']}")
    return "\n".join(lines)
