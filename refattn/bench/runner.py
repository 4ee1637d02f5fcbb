"""``refattn bench``: the sweep, its table, its JSON and its plots; ``--targets``: the performance targets.

One result per (backend, algorithm, direction, dtype, L): median and IQR of the timed calls,
achieved and dense-equivalent GFLOP/s, GB/s of the compulsory traffic, peak memory above the
inputs. A case that cannot run here is recorded as skipped with its reason (a "—" cell); a case
that fails is recorded as an error with its message, never as a number.

Long sequences: lengths run in increasing order and each (backend, algorithm, direction, dtype)
series stops growing at the first length that cannot fit: its inputs, output and gradients exceed
the memory available (checked before the case is built), it runs out of memory (the process may map
no more than was available; the case fails cleanly and is recorded), or its predicted call time (the
previous length's median scaled by the FLOP model) exceeds ``--call-budget``. A call predicted to
outlast ``--max-seconds`` is timed once, without a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refattn import arguments as types
from refattn import figures

from . import cases, measure

DEFAULT_TOKENS = 16384
DEFAULT_REPEATS = 5
DEFAULT_OUT = "bench-results"
SWEEP_ONLY = ("backend", "algorithm", "length", "direction", "dtype", "tokens", "batch", "heads", "dim", "top_k",
              "clusters", "window", "profile", "dense_max_gflop", "max_seconds", "warmup", "call_budget",
              "memory_budget", "no_memory", "no_plots")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn bench``, each validated by its type (:mod:`refattn.arguments`)."""
    from refattn.routing.profiles import PROFILE_NAMES

    from . import targets

    positive, count = types.integer(1), types.integer(0)
    parser.add_argument("--backend", action="append", type=types.backend_name(cases.PEER), metavar="NAME",
                        help=f"a registered backend or the peer {cases.PEER!r} (repeatable; default: all)")
    parser.add_argument("--algorithm", action="append", choices=cases.ALGORITHMS, help="(repeatable; default: all)")
    parser.add_argument("--length", action="append", type=positive, metavar="L",
                        help=f"sequence length (repeatable; default: {' '.join(map(str, cases.LENGTHS))})")
    parser.add_argument("--direction", action="append", choices=cases.DIRECTIONS, help="(repeatable; default: all)")
    parser.add_argument("--dtype", action="append", choices=types.DTYPES,
                        help="(repeatable; default float32; the NumPy reference computes in float64 whatever it gets)")
    parser.add_argument("--repeats", type=positive, metavar="N",
                        help=f"timed calls per case (default {DEFAULT_REPEATS}); with --targets, interleaved pairs "
                             f"per target (default and minimum {targets.MIN_REPEATS})")
    parser.add_argument("--warmup", type=count, metavar="N", help="untimed calls first (default 1)")
    parser.add_argument("--max-seconds", type=types.number(0, open_low=True), metavar="S",
                        help="stop timing a case once its timed calls took this long (default 60)")
    parser.add_argument("--call-budget", type=types.number(0, open_low=True), metavar="S",
                        help="stop a series before the length whose predicted single call exceeds S seconds "
                             "(default 600)")
    parser.add_argument("--memory-budget", type=types.number(0, open_low=True), metavar="GIB",
                        help="use at most this much memory (default: all the memory available)")
    parser.add_argument("--tokens", type=positive, help=f"B = max(1, tokens // L) (default {DEFAULT_TOKENS})")
    parser.add_argument("--batch", type=positive, metavar="B", help="fixed B instead of the token budget")
    parser.add_argument("--heads", type=positive, metavar="H", help="(default 8)")
    parser.add_argument("--dim", type=positive, metavar="D", help="head dimension (default 64)")
    parser.add_argument("--top-k", type=positive, metavar="K", help="FSAT's K (default 16)")
    parser.add_argument("--clusters", type=positive, metavar="C", help="routing C (default round(sqrt(L)))")
    parser.add_argument("--window", type=positive, metavar="W", help="routing W (default ceil(L / C))")
    parser.add_argument("--profile", choices=PROFILE_NAMES,
                        help="routing profile (default lucidrains: the peer's function)")
    parser.add_argument("--device", type=types.device,
                        help="cpu, cuda or cuda:N (sweep default: cuda when present, else cpu; --targets: cpu, "
                             "or cuda for the GPU targets)")
    parser.add_argument("--dense-max-gflop", type=types.number(0, open_low=True), metavar="GFLOP",
                        help="skip dense cases above this many GFLOP (default 2500 for SDPA, 150 for NumPy's)")
    parser.add_argument("--out", type=types.output_directory, metavar="DIR",
                        help=f"where the JSON and the plots go (default {DEFAULT_OUT})")
    parser.add_argument("--json", type=types.output_file, metavar="PATH",
                        help="write the JSON here (default DIR/bench.json, with --targets DIR/targets.json)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--targets", action="store_true",
                        help="measure the performance targets (interleaved pairs; median, range, verdict) instead "
                             "of a sweep")
    parser.add_argument("--target", action="append", choices=[target.name for target in targets.TARGETS],
                        metavar="NAME", help="only this target (repeatable; default: every target of the device)")


def check_arguments(arguments: argparse.Namespace) -> None:
    """The checks that involve several options; ``ValueError`` naming them."""
    from . import targets

    given = [name for name in SWEEP_ONLY if getattr(arguments, name) not in (None, False)]
    if arguments.targets:
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{options}: {'is not an option' if len(given) == 1 else 'are not options'} of --targets "
                             f"(each target fixes its backends, shapes and dtype)")
        if arguments.repeats is not None and arguments.repeats < targets.MIN_REPEATS:
            raise ValueError(f"--repeats: the targets need at least {targets.MIN_REPEATS} interleaved pairs, "
                             f"got {arguments.repeats}")
        if arguments.target:
            device = arguments.device or "cpu"
            other = [name for name in arguments.target if name not in {t.name for t in targets.for_device(device)}]
            if other:
                raise ValueError(f"--target: {', '.join(other)} is not measured with --device {device} "
                                 f"(its targets: {', '.join(t.name for t in targets.for_device(device))})")
    elif arguments.target:
        raise ValueError("--target: only with --targets")
    if arguments.batch is not None and arguments.tokens is not None:
        raise ValueError("--batch, --tokens: give one (B fixed, or B from the token budget)")


def _progress(items: list[Any], enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    return items


def _budget(memory_budget: float | None) -> int | None:
    """Bytes a case may use: what is available now, capped by ``memory_budget`` (GiB)."""
    available = measure.available_bytes()
    if memory_budget is None:
        return available
    budget = int(memory_budget * 2**30)
    return budget if available is None else min(available, budget)


def sweep(*, backends: Iterable[str], algorithms: Iterable[str], lengths: Iterable[int], directions: Iterable[str],
          dtypes: Iterable[str], repeats: int = DEFAULT_REPEATS, warmup: int = 1, tokens: int = DEFAULT_TOKENS,
          batch: int | None = None, heads: int = 8, dim: int = 64, top_k: int = 16, clusters: int | None = None,
          window: int | None = None, profile: str = "lucidrains", device: str | None = None,
          dense_max_gflop: float | None = None, max_seconds: float | None = 60.0, call_budget: float | None = 600.0,
          memory_budget: float | None = None, memory: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """Run every combination, shortest lengths first; returns the result records (also those skipped, with
    their reason)."""
    plan = [(b, a, d, t, n) for n in sorted(set(lengths)) for b in backends for a in algorithms for d in directions
            for t in dtypes if not (b == cases.PEER and a != "routing")]  # the peer implements routing only
    results: list[dict[str, Any]] = []
    last: dict[tuple[str, str, str, str], tuple[float, float, int]] = {}  # series -> (median s, FLOPs, L)
    stopped: dict[tuple[str, str, str, str], str] = {}  # series -> why its longer lengths are not run
    bar = _progress(plan, progress)
    for backend, algorithm, direction, dtype, length in bar:
        series = (backend, algorithm, direction, dtype)
        if hasattr(bar, "set_description"):
            bar.set_description(f"{backend}/{algorithm} {direction} {dtype} L={length}")
        shape = cases.Shape(batch if batch is not None else cases.batch_for(length, tokens), heads, length, dim,
                            top_k, clusters, window)
        record: dict[str, Any] = {"backend": backend, "algorithm": algorithm, "direction": direction, "dtype": dtype,
                                  "length": length, "batch": shape.batch, "heads": heads, "dim": dim}
        if series in stopped:
            results.append({**record, "status": "skipped", "reason": stopped[series]})
            continue
        predicted = None
        if series in last:
            median, work, shorter = last[series]
            predicted = median * cases.flops(algorithm, direction, shape) / work
            if call_budget is not None and predicted > call_budget:
                stopped[series] = (f"predicted {predicted:.0f} s per call (from {median:.3g} s at L={shorter}, scaled "
                                   f"by the FLOP model) exceeds the call budget of {call_budget:g} s")
                results.append({**record, "status": "skipped", "reason": stopped[series]})
                continue
        # a call predicted to outlast the timing budget is timed once, without a warm-up call before it
        long_call = predicted is not None and max_seconds is not None and predicted >= max_seconds
        available = _budget(memory_budget)
        with measure.address_space_limit(available):
            record = _measure_case(record, shape, available, profile=profile, device=device,
                                   dense_max_gflop=dense_max_gflop, repeats=1 if long_call else repeats,
                                   warmup=0 if long_call else warmup, max_seconds=max_seconds, memory=memory)
        if record["status"] == "ok":
            last[series] = (record["median_s"], record["flops"], length)
        elif record.get("out_of_memory") or record["reason"].startswith("needs at least"):
            stopped[series] = f"L={length} does not fit in the memory available ({record['reason']})"
        results.append(record)
    return results


def _measure_case(record: dict[str, Any], shape: cases.Shape, available: int | None, *, profile: str,
                  device: str | None, dense_max_gflop: float | None, repeats: int, warmup: int,
                  max_seconds: float | None, memory: bool) -> dict[str, Any]:
    """Build, time and measure one case; the record with status ok, skipped or error."""
    try:
        case = cases.build_case(record["backend"], record["algorithm"], record["direction"], record["dtype"], shape,
                                profile=profile, device=device, dense_max_gflop=dense_max_gflop,
                                memory_available=available)
    except cases.Unsupported as error:
        return {**record, "status": "skipped", "reason": str(error)}
    except Exception as error:  # noqa: BLE001 - recorded with its message, never as a number
        return {**record, "status": "error", "reason": f"{type(error).__name__}: {error}",
                "out_of_memory": measure.out_of_memory(error)}
    record = {**record, **case.info, "warmup_calls": warmup}
    try:
        times = measure.time_calls(case.fn, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
        stats = measure.summarize(times)
        record.update(stats, times_s=times, status="ok")
        record["gflops"] = record["flops"] / stats["median_s"] / 1e9
        record["dense_equiv_gflops"] = record["dense_flops"] / stats["median_s"] / 1e9
        record["gbps"] = record["bytes"] / stats["median_s"] / 1e9
        if memory:
            record["peak_bytes"], record["memory_method"] = case.peak_memory()
    except Exception as error:  # noqa: BLE001
        record.update(status="error", reason=f"{type(error).__name__}: {error}",
                      out_of_memory=measure.out_of_memory(error))
    return record


def _mib(value: Any) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def _baseline(record: dict[str, Any]) -> str:
    """Which dense baseline a result is compared with: NumPy's for NumPy arrays, else torch's SDPA."""
    return "numpy" if record.get("framework") == "numpy" else "torch"


def _dtype_label(record: dict[str, Any]) -> str:
    """The dtype a result was computed in, starred when that is not the dtype asked for (the NumPy
    reference computes in float64 whatever it gets)."""
    compute = record.get("compute_dtype", record["dtype"])
    return compute if compute == record["dtype"] else f"{compute}*"


def table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table, one row per result; speedup vs the same framework's dense baseline."""
    dense = {(r["direction"], r["dtype"], r["length"], r["batch"], _baseline(r)): r
             for r in results if r["algorithm"] == "dense" and r.get("status") == "ok"}
    header = (f"{'backend':<11} {'algorithm':<8} {'dir':<6} {'dtype':<9} {'L':>8} {'B':>3} {'median ms':>10} "
              f"{'IQR ms':>8} {'GFLOP/s':>8} {'dense-eq':>9} {'peak MiB':>9} {'vs dense':>9}")
    lines = [header, "-" * len(header)]
    skipped: dict[tuple[str, str, str], list[str]] = {}
    starred = False
    for r in sorted(results, key=lambda r: (r["direction"], r["dtype"], r["length"], r["algorithm"], r["backend"])):
        if r.get("status") != "ok":
            key = (r["backend"], r["status"], r.get("reason", ""))
            skipped.setdefault(key, []).append(f"{r['algorithm']} {r['direction']} {r['dtype']} L={r['length']}")
            continue
        base = dense.get((r["direction"], r["dtype"], r["length"], r["batch"], _baseline(r)))
        speedup = f"{base['median_s'] / r['median_s']:.1f}x" if base is not None and r["algorithm"] != "dense" else "—"
        dtype = _dtype_label(r)
        starred |= dtype.endswith("*")
        lines.append(f"{r['backend']:<11} {r['algorithm']:<8} {r['direction']:<6} {dtype:<9} {r['length']:>8} "
                     f"{r['batch']:>3} {r['median_s'] * 1e3:>10.2f} {r['iqr_s'] * 1e3:>8.2f} {r['gflops']:>8.2f} "
                     f"{r['dense_equiv_gflops']:>9.1f} {_mib(r.get('peak_bytes')):>9} {speedup:>9}")
    if starred:
        lines.append("* computed in this dtype from inputs drawn for another: the NumPy reference computes in float64 "
                     "whatever it gets (its rows sit with the dtype asked for)")
    if skipped:
        lines += ["", "not run:"]
        for (backend, status, reason), which in skipped.items():
            shown = ", ".join(which[:4]) + (f" and {len(which) - 4} more" if len(which) > 4 else "")
            lines.append(f"  {backend} ({status}, {len(which)} cases: {shown}): {reason}")
    return "\n".join(lines)


GUIDES = (("O(L log L)", lambda length: length * math.log2(length)), ("O(L²)", lambda length: float(length) ** 2))


def _guides(ax: Any, rows: list[dict[str, Any]], key: str, scale: float) -> None:
    """Dotted grey O(L log L) and O(L²) lines through the first point of the FSAT series with the most
    points (else of any series; ties: the lowest), each scaled by the batch at every L (the token budget
    makes B vary with L)."""
    measured = [r for r in rows if r.get(key)]
    candidates = [r for r in measured if r["algorithm"] == "fsat"] or measured
    points = {series: sorted((r for r in candidates if (r["backend"], r["algorithm"]) == series),
                             key=lambda r: r["length"])
              for series in {(r["backend"], r["algorithm"]) for r in candidates}}
    anchor = min(points.values(), key=lambda series: (-len(series), series[0][key]))[0]  # longest, then fastest
    batches = {r["length"]: r["batch"] for r in rows}
    lengths = sorted(batches)
    for label, growth in GUIDES:
        unit = anchor[key] * scale / (anchor["batch"] * growth(anchor["length"]))
        ax.plot(lengths, [unit * batches[n] * growth(n) for n in lengths], ":", color="grey", linewidth=1,
                label=f"{label} through {anchor['backend']} {anchor['algorithm']}")


def plots(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per (direction, dtype): time vs L and peak memory vs L, log-log, one line per backend×algorithm,
    with the O(L log L) and O(L²) guides."""
    plt = figures.pyplot()
    written = []
    ok = [r for r in results if r.get("status") == "ok"]
    for direction in sorted({r["direction"] for r in ok}):
        for dtype in sorted({r["dtype"] for r in ok if r["direction"] == direction}):
            rows = [r for r in ok if r["direction"] == direction and r["dtype"] == dtype]
            for metric, key, ylabel, scale in (("time", "median_s", "median time per call [s]", 1.0),
                                               ("memory", "peak_bytes", "peak memory above inputs [MiB]", 2**-20)):
                fig, ax = plt.subplots(figsize=(6.4, 4.4))
                drawn = False
                for series in sorted({(r["backend"], r["algorithm"]) for r in rows}):
                    points = sorted((r["length"], r[key], _dtype_label(r)) for r in rows
                                    if (r["backend"], r["algorithm"]) == series and r.get(key))
                    if not points:
                        continue
                    label = f"{series[0]} {series[1]}"
                    if points[0][2] != dtype:
                        label += f" (computes in {points[0][2].rstrip('*')})"
                    style = "--" if series[1] == "dense" else ":" if series[0] == cases.PEER else "-"
                    ax.plot([p[0] for p in points], [p[1] * scale for p in points], style, marker="o", label=label)
                    drawn = True
                if not drawn:
                    plt.close(fig)
                    continue
                _guides(ax, rows, key, scale)
                batches = sorted({(r["length"], r["batch"]) for r in rows})
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length L (B = " + ", ".join(f"{b}" for _, b in batches) + ")")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{direction} {dtype}, H={rows[0]['heads']} D={rows[0]['dim']} "
                             f"({rows[0].get('device', '')})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
                written.append(figures.save(fig, out_dir / f"{metric}_{direction}_{dtype}.png", dpi=120))
    return written


def _write_json(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"json: {path}")


def _cuda_missing(device: str) -> str | None:
    """Why ``device`` (cuda, cuda:N) cannot be used here, or None."""
    try:
        import torch
    except ImportError as error:
        return f"torch cannot be imported ({error}); install it with: pip install 'refattn[torch]'"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"{device} does not exist ({torch.cuda.device_count()} CUDA devices)"
    return None


def run(arguments: argparse.Namespace) -> int:
    """The ``refattn bench`` command; ``arguments.parser`` reports usage errors (exit status 2)."""
    try:
        check_arguments(arguments)
    except ValueError as error:
        arguments.parser.error(str(error))
    if arguments.device and arguments.device.startswith("cuda"):
        missing = _cuda_missing(arguments.device)
        if missing:
            print(f"refattn bench: no CUDA device: {missing}", file=sys.stderr)
            return 1
    out_dir = Path(_given(arguments.out, DEFAULT_OUT))
    machine = measure.machine_info()
    started = time.time()
    config = {key: value for key, value in vars(arguments).items() if key not in ("run", "parser")}  # command_line too
    payload: dict[str, Any] = {"machine": machine, "config": config}
    print(f"machine: {measure.describe(machine)}")
    if arguments.targets:
        from . import targets

        device = arguments.device or "cpu"
        chosen = [t for t in targets.for_device(device) if not arguments.target or t.name in arguments.target]
        records = targets.run(chosen, repeats=arguments.repeats or targets.MIN_REPEATS, device=device)
        payload["targets"] = records
        print()
        print(targets.table(records))
        json_path = Path(arguments.json) if arguments.json else out_dir / "targets.json"
    else:
        results = sweep(
            backends=arguments.backend or cases.available_backends(),
            algorithms=arguments.algorithm or list(cases.ALGORITHMS),
            lengths=arguments.length or list(cases.LENGTHS),
            directions=arguments.direction or list(cases.DIRECTIONS),
            dtypes=arguments.dtype or ["float32"],
            repeats=_given(arguments.repeats, DEFAULT_REPEATS), warmup=_given(arguments.warmup, 1),
            tokens=_given(arguments.tokens, DEFAULT_TOKENS), batch=arguments.batch, heads=_given(arguments.heads, 8),
            dim=_given(arguments.dim, 64), top_k=_given(arguments.top_k, 16), clusters=arguments.clusters,
            window=arguments.window, profile=_given(arguments.profile, "lucidrains"), device=arguments.device,
            dense_max_gflop=arguments.dense_max_gflop,
            max_seconds=_given(arguments.max_seconds, 60.0), call_budget=_given(arguments.call_budget, 600.0),
            memory_budget=arguments.memory_budget, memory=not arguments.no_memory, progress=not arguments.no_progress,
        )
        payload["results"] = results
        print(table(results))
        if not arguments.no_plots:
            out_dir.mkdir(parents=True, exist_ok=True)
            for path in plots(results, out_dir):
                print(f"plot: {path}")
        json_path = Path(arguments.json) if arguments.json else out_dir / "bench.json"
    payload["machine"]["load_average_end"] = measure.load_average()
    payload["elapsed_s"] = time.time() - started
    print(f"load average at the end: {payload['machine']['load_average_end']}")
    _write_json(payload, json_path)
    return 0


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value
