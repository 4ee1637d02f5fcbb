"""The performance rule of ``refattn bench --targets``, checked exactly on fake cases whose times and peaks the
test controls (interleaving, per-side median and range, per-pair ratios, verdict on the median), the targets
table against issue 13 and the GPU targets of issue 11 E, and one real target at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
from dataclasses import dataclass
from typing import Any

import pytest

from refattn.bench import cases, measure, models, targets

SHAPE = cases.Shape(batch=1, heads=2, length=8, dim=4, top_k=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeCase(cases.Case):
    peak: int | None = None

    def peak_memory(self) -> tuple[int | None, str]:
        self.calls.append(f"{self.backend}:memory")
        return self.peak, "fake"

    @property
    def calls(self) -> list[str]:
        return self.info["log"]


def fake_builder(durations: dict[str, list[float]], clock: FakeClock, log: list[str],
                 peaks: dict[str, int] | None = None, input_bytes: int = 100) -> targets.Builder:
    """Cases named by their side's backend; each call takes the next of its durations (warm-up first)."""

    def build(side: targets.Side) -> cases.Case:
        name = side.backend
        remaining = durations.get(name, [])

        def fn() -> None:
            log.append(name)
            clock.now += remaining.pop(0)

        info = {"backend": name, "algorithm": side.algorithm, "direction": side.direction, "dtype": side.dtype,
                "batch": side.shape.batch, "heads": side.shape.heads, "length": side.shape.length,
                "dim": side.shape.dim, "top_k": side.shape.top_k, "input_bytes": input_bytes, "log": log}
        return FakeCase(name, side.algorithm, side.direction, side.dtype, "cpu", side.shape, fn, "fake", info,
                        peak=(peaks or {}).get(name))

    return build


def _target(kind: str, threshold: float, at_most: bool, sides: int = 2) -> targets.Target:
    names = ("slow", "fast")[:sides]
    return targets.Target(f"fake-{kind}", "a claim", kind,
                          tuple(targets.Side(name, "fsat", "fwdbwd", SHAPE, "float32") for name in names),
                          threshold, at_most=at_most, value_label="slow / fast")


SLOW = [100.0, 10.0, 12.0, 11.0, 13.0, 9.0, 14.0, 10.5]  # warm-up first
FAST = [50.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 0.5]


def test_time_ratio_interleaves_and_judges_the_median_of_the_pair_ratios() -> None:
    clock, log = FakeClock(), []
    build = fake_builder({"slow": list(SLOW), "fast": list(FAST)}, clock, log)
    record = targets.measure_target(_target("time ratio", 7.0, at_most=False), build, repeats=7, clock=clock)
    assert log == ["slow", "fast"] + ["slow", "fast"] * 7  # one untimed call each, then a, b, a, b, ...
    slow, fast = record["sides"]
    assert slow["times_s"] == SLOW[1:] and fast["times_s"] == FAST[1:]  # the warm-up is not timed
    assert (slow["median_s"], slow["min_s"], slow["max_s"]) == (11.0, 9.0, 14.0)
    assert (fast["median_s"], fast["min_s"], fast["max_s"]) == (1.0, 0.5, 2.0)
    ratios = [10.0, 6.0, 11.0, 13.0, 4.5, 14.0, 21.0]
    assert record["ratios"] == ratios
    assert record["value"] == statistics.median(ratios) == 11.0
    assert record["range"] == [4.5, 21.0] and record["pairs"] == 7
    assert record["verdict"] == "met"
    assert record["load_average_before"] is not None and record["load_average_after"] is not None
    assert record["cpu_stolen"] is None or 0.0 <= record["cpu_stolen"] <= 1.0


def test_stolen_share_of_cpu_ticks():
    """Steal over all ticks between two readings of /proc/stat's counters (user, nice, system, idle, iowait,
    irq, softirq, steal), and the line that reports it."""
    before, after = [100, 0, 10, 500, 0, 0, 0, 20], [150, 0, 20, 530, 0, 0, 0, 50]  # 30 of 120 ticks stolen
    assert measure.stolen_share(before, after) == 0.25
    assert measure.stolen_share(None, after) is None and measure.stolen_share(before, before) is None
    ticks = measure.cpu_ticks()
    assert ticks is None or (len(ticks) == 8 and all(t >= 0 for t in ticks))
    record = targets.measure_target(_target("memory ratio", 1.0, at_most=True),
                                    fake_builder({}, FakeClock(), [], peaks={"slow": 10, "fast": 20}))
    record["cpu_stolen"] = 0.25
    assert "CPU time stolen by the hypervisor: 25%" in targets.format_record(record)


@pytest.mark.parametrize(("threshold", "at_most", "verdict"), [
    (11.0, False, "met"),  # the median equals the threshold: met
    (11.01, False, "NOT met"),  # the median misses although the range reaches 21
    (4.0, False, "met"),
    (11.0, True, "met"),
    (10.99, True, "NOT met"),  # the median misses although the range reaches down to 4.5
])
def test_the_verdict_rests_on_the_median_only(threshold: float, at_most: bool, verdict: str) -> None:
    clock = FakeClock()
    build = fake_builder({"slow": list(SLOW), "fast": list(FAST)}, clock, [])
    record = targets.measure_target(_target("time ratio", threshold, at_most), build, repeats=7, clock=clock)
    assert record["verdict"] == verdict


def test_more_pairs_than_the_minimum() -> None:
    clock, log = FakeClock(), []
    build = fake_builder({"slow": [1.0] + [3.0] * 9, "fast": [1.0] + [1.0, 2.0, 3.0] * 3}, clock, log)
    record = targets.measure_target(_target("time ratio", 2.0, at_most=False), build, repeats=9, clock=clock)
    assert record["pairs"] == 9 and record["ratios"] == [3.0, 1.5, 1.0] * 3
    assert record["value"] == 1.5 and record["verdict"] == "NOT met"


@pytest.mark.parametrize("repeats", [0, 1, 6, 7.0, True])
def test_fewer_than_seven_pairs_is_refused(repeats: Any) -> None:
    build = fake_builder({"slow": [1.0] * 8, "fast": [1.0] * 8}, FakeClock(), [])
    with pytest.raises(ValueError, match="repeats: a target needs at least 7 interleaved pairs"):
        targets.measure_target(_target("time ratio", 1.0, at_most=False), build, repeats=repeats)
    with pytest.raises(ValueError, match="repeats: a target needs at least 7 interleaved pairs"):
        targets.run([_target("time ratio", 1.0, at_most=False)], repeats=repeats, build=build, log=lambda _: None)


def test_a_time_target_on_one_side() -> None:
    clock, log = FakeClock(), []
    build = fake_builder({"slow": [40.0, 31.0, 29.0, 30.0, 28.0, 35.0, 29.5, 30.5]}, clock, log)
    record = targets.measure_target(_target("time", 30.0, at_most=True, sides=1), build, clock=clock)
    assert log == ["slow"] * 8
    assert record["value"] == 30.0 and record["range"] == [28.0, 35.0] and record["calls"] == 7
    assert record["verdict"] == "met"


def test_memory_against_what_fsat_retains() -> None:
    retained = models.fsat_retained_bytes(1, 2, 8, 4, 2, itemsize=4)["total"]
    log: list[str] = []
    build = fake_builder({}, FakeClock(), log, peaks={"slow": int(1.5 * retained)})
    record = targets.measure_target(_target("memory / retained", 1.5, at_most=True, sides=1), build)
    assert log == ["slow:memory"]  # one untimed call: the allocator's peak is exact
    assert record["value"] == int(1.5 * retained) / retained and record["verdict"] == "met"
    build = fake_builder({}, FakeClock(), [], peaks={"slow": int(1.5 * retained) + 4})
    assert targets.measure_target(_target("memory / retained", 1.5, True, 1), build)["verdict"] == "NOT met"


def test_the_retained_bytes_are_output_gradients_and_saved_probabilities() -> None:
    # B = 1, H = 8, L = 16,384, D = 64, K = 16, float32: out 32 MiB, dq dk dv 96 MiB (+ dw 2 KiB), probabilities 8 MiB
    parts = models.fsat_retained_bytes(1, 8, 16384, 64, 16, itemsize=4)
    assert parts == {"output": 32 * 2**20, "gradients": 96 * 2**20 + 8 * 64 * 4, "probabilities": 8 * 2**20,
                     "total": 136 * 2**20 + 8 * 64 * 4}
    million = models.fsat_retained_bytes(1, 8, 2**20, 64, 16, itemsize=4)  # issue 13: 8.5 GiB
    assert million["total"] - 8 * 64 * 4 == 8.5 * 2**30
    assert models.fsat_retained_bytes(1, 1, 3, 2, 16, itemsize=8)["probabilities"] == 3 * 5 * 8  # K_eff = 2L - 1
    assert models.fsat_retained_bytes(1, 1, 3, 2, 16, itemsize=8, causal=True)["probabilities"] == 3 * 3 * 8


def test_memory_ratio_and_memory_total() -> None:
    build = fake_builder({}, FakeClock(), [], peaks={"slow": 300, "fast": 400})
    record = targets.measure_target(_target("memory ratio", 1.0, at_most=True), build)
    assert record["value"] == 0.75 and record["verdict"] == "met"
    build = fake_builder({}, FakeClock(), [], peaks={"slow": 1000}, input_bytes=24 * 2**30 - 999)
    record = targets.measure_target(_target("memory total", 24.0 * 2**30, at_most=True, sides=1), build)
    assert record["value"] == 24 * 2**30 + 1 and record["verdict"] == "NOT met"


def test_what_cannot_be_measured_is_reported_with_the_reason() -> None:
    def unsupported(side: targets.Side) -> cases.Case:
        raise cases.Unsupported("routing_transformer is not installed")

    def out_of_memory(side: targets.Side) -> cases.Case:
        raise MemoryError("Unable to allocate 8.00 GiB")

    def broken(side: targets.Side) -> cases.Case:
        raise RuntimeError("shapes do not match")

    target = _target("time ratio", 1.0, at_most=False)
    assert targets.measure_target(target, unsupported)["verdict"] == (
        "not measured: routing_transformer is not installed")
    verdict = targets.measure_target(target, out_of_memory)["verdict"]
    assert re.fullmatch(r"not measured: ran out of the \d+\.\d GiB available \(MemoryError: Unable to allocate "
                        r"8\.00 GiB\)", verdict), verdict
    assert targets.measure_target(target, broken)["verdict"] == "error: RuntimeError: shapes do not match"
    build = fake_builder({}, FakeClock(), [], peaks={})
    assert targets.measure_target(_target("memory ratio", 1.0, True), build)["verdict"].startswith(
        "not measured: slow fsat fwdbwd float32 B=1 H=2 L=8 D=4 K=2: peak memory fake")


def test_run_prints_each_target_and_the_table_prints_median_range_threshold_verdict() -> None:
    clock, printed = FakeClock(), []
    build = fake_builder({"slow": list(SLOW), "fast": list(FAST)}, clock, [])
    records = targets.run([_target("time ratio", 7.0, at_most=False)], build=build, log=printed.append, clock=clock)
    assert printed[0] == "[fake-time ratio] a claim"
    assert "slow / fast, 7 interleaved pairs: median 11.00, range 4.50 to 21.00; target >= 7 -> met" in printed[1]
    assert "median 11.00 s, range 9.00 s to 14.00 s (7 calls)" in printed[1]
    table = targets.table(records)
    assert table.splitlines()[-1].split() == ["fake-time", "ratio", "11.00", "(4.50-21.00)", ">=", "7", "met"]
    json.dumps(records)  # the record goes into the JSON as it is


def test_the_cpu_targets_are_issue_13s() -> None:
    by_name = {target.name: target for target in targets.for_device("cpu")}
    shape = lambda length, **kw: cases.Shape(batch=kw.pop("batch", 1), heads=8, length=length, dim=64, **kw)  # noqa: E731
    fsat = lambda length, direction="fwdbwd", batch=1: targets.Side(  # noqa: E731
        "torch", "fsat", direction, shape(length, batch=batch, top_k=16), "float32")
    sdpa = lambda length, direction="fwdbwd", batch=1: targets.Side(  # noqa: E731
        "torch", "dense", direction, shape(length, batch=batch), "float32")
    routing = lambda backend, length, c: targets.Side(  # noqa: E731
        backend, "routing", "fwdbwd", shape(length, clusters=c, window=c), "float32")
    expected = {
        "fsat-time-1m": ("time", (fsat(2**20),), 30.0, True),
        "fsat-memory-1m": ("memory / retained", (fsat(2**20),), 1.5, True),
        "fsat-forward-memory-2m": ("memory total", (fsat(2**21, "fwd"),), 24 * 2**30, True),
        "fsat-vs-sdpa-16k": ("time ratio", (sdpa(16384), fsat(16384)), 50.0, False),
        "fsat-scaling-64k": ("time ratio", (fsat(65536), fsat(16384)), 4.5, True),
        "fsat-vs-sdpa-forward-1k": ("time ratio", (sdpa(1024, "fwd", 16), fsat(1024, "fwd", 16)), 1.0, False),
        "routing-vs-lucidrains-4k": ("time ratio", (routing("lucidrains", 4096, 64), routing("torch", 4096, 64)),
                                     2.0, False),
        "routing-memory-4k": ("memory ratio", (routing("torch", 4096, 64), routing("lucidrains", 4096, 64)), 1.0,
                              True),
        "routing-vs-lucidrains-16k": ("time ratio", (routing("lucidrains", 16384, 128),
                                                     routing("torch", 16384, 128)), 2.0, False),
        "routing-memory-16k": ("memory ratio", (routing("torch", 16384, 128), routing("lucidrains", 16384, 128)),
                               1.0, True),
        "fsat-memory-16k": ("memory / retained", (fsat(16384),), 1.5, True),
        "fsat-memory-64k": ("memory / retained", (fsat(65536),), 1.5, True),
    }
    assert {name: (t.kind, t.sides, t.threshold, t.at_most) for name, t in by_name.items()} == expected


def test_the_gpu_targets_are_issue_11s() -> None:
    by_name = {target.name: target for target in targets.for_device("cuda:0")}
    assert set(by_name) == {"gpu-fsat-vs-flash-64k", "gpu-cupy-fsat-64k", "gpu-numba-fsat-64k",
                            "gpu-routing-vs-lucidrains-16k"}
    flash = by_name["gpu-fsat-vs-flash-64k"]
    assert [(s.backend, s.algorithm, s.dtype, s.sdpa, s.shape.length) for s in flash.sides] == [
        ("torch", "dense", "bfloat16", "flash", 65536), ("torch", "fsat", "bfloat16", None, 65536)]
    assert (flash.threshold, flash.at_most) == (10.0, False)
    for name, backend in (("gpu-cupy-fsat-64k", "cupy"), ("gpu-numba-fsat-64k", "numba_cuda")):
        target = by_name[name]
        assert [s.backend for s in target.sides] == [backend, "torch"]
        assert target.sides[0].dtype == target.sides[1].dtype  # the same dtype on both sides
        assert (target.threshold, target.at_most) == (2.0, True)
    routing = by_name["gpu-routing-vs-lucidrains-16k"]
    assert [(s.backend, s.dtype, s.shape.num_clusters, s.shape.window_size) for s in routing.sides] == [
        ("lucidrains", "bfloat16", 128, 128), ("torch", "bfloat16", 128, 128)]
    for target in by_name.values():
        assert all((s.shape.batch, s.shape.heads, s.shape.dim) == (1, 8, 64) for s in target.sides)
        assert all(s.shape.top_k == 16 for s in target.sides if s.algorithm == "fsat")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_real_target_at_tiny_shapes() -> None:
    tiny = lambda algorithm, direction: targets.Side(  # noqa: E731
        "torch", algorithm, direction, cases.Shape(batch=1, heads=2, length=32, dim=8, top_k=4), "float32")
    chosen = [
        targets.Target("tiny-ratio", "tiny", "time ratio", (tiny("dense", "fwdbwd"), tiny("fsat", "fwdbwd")), 1e-9,
                       at_most=False),
        targets.Target("tiny-memory", "tiny", "memory / retained", (tiny("fsat", "fwdbwd"),), 1e9, at_most=True),
    ]
    ratio, memory = targets.run(chosen, device="cpu", log=lambda _: None)  # each in a fresh process
    assert len({ratio["process"], memory["process"], os.getpid()}) == 3
    assert ratio["verdict"] == "met" and len(ratio["ratios"]) == 7
    assert all(t > 0 for side in ratio["sides"] for t in side["times_s"])
    assert memory["verdict"] == "met" and memory["sides"][0]["peak_bytes"] > 0
    assert memory["sides"][0]["memory_method"] == "torch.profiler memory events"
    # the inputs q, k, v, dout (1, 2, 32, 8) and w (2, 8), float32
    assert memory["sides"][0]["input_bytes"] == 4 * (4 * 2 * 32 * 8 + 2 * 8)
