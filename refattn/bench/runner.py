"""``refattn bench``: the sweep, its table, its JSON and its plots.

One result per (backend, algorithm, direction, dtype, L): median and IQR of the timed calls,
achieved and dense-equivalent GFLOP/s, GB/s of the compulsory traffic, peak memory above the
inputs. A case that cannot run here is recorded as skipped with its reason (a "—" cell); a case
that fails is recorded as an error with its message, never as a number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import cases, measure

DEFAULT_TOKENS = 16384


def _progress(items: list[Any], enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    return items


def sweep(*, backends: Iterable[str], algorithms: Iterable[str], lengths: Iterable[int], directions: Iterable[str],
          dtypes: Iterable[str], repeats: int = 5, warmup: int = 1, tokens: int = DEFAULT_TOKENS,
          batch: int | None = None, heads: int = 8, dim: int = 64, top_k: int = 16, clusters: int | None = None,
          window: int | None = None, profile: str = "lucidrains", device: str | None = None,
          dense_max_gflop: float = 2500.0, max_seconds: float | None = 60.0, memory: bool = True,
          progress: bool = True) -> list[dict[str, Any]]:
    """Run every combination; returns the result records (also those skipped, with their reason)."""
    plan = [(b, a, d, t, n) for n in lengths for b in backends for a in algorithms for d in directions for t in dtypes
            if not (b == cases.PEER and a != "routing")]  # the peer implements routing only
    results: list[dict[str, Any]] = []
    bar = _progress(plan, progress)
    for backend, algorithm, direction, dtype, length in bar:
        label = f"{backend}/{algorithm} {direction} {dtype} L={length}"
        if hasattr(bar, "set_description"):
            bar.set_description(label)
        shape = cases.Shape(batch if batch is not None else cases.batch_for(length, tokens), heads, length, dim,
                            top_k, clusters, window)
        record: dict[str, Any] = {"backend": backend, "algorithm": algorithm, "direction": direction, "dtype": dtype,
                                  "length": length, "batch": shape.batch, "heads": heads, "dim": dim}
        try:
            case = cases.build_case(backend, algorithm, direction, dtype, shape, profile=profile, device=device,
                                    dense_max_gflop=dense_max_gflop)
        except cases.Unsupported as error:
            results.append({**record, "status": "skipped", "reason": str(error)})
            continue
        except Exception as error:  # noqa: BLE001 - recorded with its message, never as a number
            results.append({**record, "status": "error", "reason": f"{type(error).__name__}: {error}"})
            continue
        record.update(case.info)
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
            record.update(status="error", reason=f"{type(error).__name__}: {error}")
        finally:
            del case
        results.append(record)
    return results


def _mib(value: Any) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def _baseline(record: dict[str, Any]) -> str:
    """Which dense baseline a result is compared with: NumPy's for NumPy arrays, else torch's SDPA."""
    return "numpy" if record.get("framework") == "numpy" else "torch"


def table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table, one row per result; speedup vs the same framework's dense baseline."""
    dense = {(r["direction"], r["dtype"], r["length"], r["batch"], _baseline(r)): r
             for r in results if r["algorithm"] == "dense" and r.get("status") == "ok"}
    header = (f"{'backend':<11} {'algorithm':<8} {'dir':<6} {'dtype':<8} {'L':>6} {'B':>3} {'median ms':>10} "
              f"{'IQR ms':>8} {'GFLOP/s':>8} {'dense-eq':>9} {'peak MiB':>9} {'vs dense':>9}")
    lines = [header, "-" * len(header)]
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for r in sorted(results, key=lambda r: (r["direction"], r["dtype"], r["length"], r["algorithm"], r["backend"])):
        if r.get("status") != "ok":
            key = (r["backend"], r["status"], r.get("reason", ""))
            skipped.setdefault(key, []).append(f"{r['algorithm']} {r['direction']} {r['dtype']} L={r['length']}")
            continue
        base = dense.get((r["direction"], r["dtype"], r["length"], r["batch"], _baseline(r)))
        speedup = f"{base['median_s'] / r['median_s']:.1f}x" if base is not None and r["algorithm"] != "dense" else "—"
        lines.append(f"{r['backend']:<11} {r['algorithm']:<8} {r['direction']:<6} {r['dtype']:<8} {r['length']:>6} "
                     f"{r['batch']:>3} {r['median_s'] * 1e3:>10.2f} {r['iqr_s'] * 1e3:>8.2f} {r['gflops']:>8.2f} "
                     f"{r['dense_equiv_gflops']:>9.1f} {_mib(r.get('peak_bytes')):>9} {speedup:>9}")
    if skipped:
        lines += ["", "not run:"]
        for (backend, status, reason), which in skipped.items():
            shown = ", ".join(which[:4]) + (f" and {len(which) - 4} more" if len(which) > 4 else "")
            lines.append(f"  {backend} ({status}, {len(which)} cases: {shown}): {reason}")
    return "\n".join(lines)


def plots(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per (direction, dtype): time vs L and peak memory vs L, log-log, one line per backend×algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in results if r.get("status") == "ok"]
    for direction in sorted({r["direction"] for r in ok}):
        for dtype in sorted({r["dtype"] for r in ok if r["direction"] == direction}):
            rows = [r for r in ok if r["direction"] == direction and r["dtype"] == dtype]
            for metric, key, ylabel in (("time", "median_s", "median time per call [s]"),
                                        ("memory", "peak_bytes", "peak memory above inputs [MiB]")):
                fig, ax = plt.subplots(figsize=(6.4, 4.4))
                drawn = False
                for series in sorted({(r["backend"], r["algorithm"]) for r in rows}):
                    points = sorted((r["length"], r[key]) for r in rows
                                    if (r["backend"], r["algorithm"]) == series and r.get(key))
                    if not points:
                        continue
                    xs = [p[0] for p in points]
                    ys = [p[1] / 2**20 if metric == "memory" else p[1] for p in points]
                    style = "--" if series[1] == "dense" else ":" if series[0] == cases.PEER else "-"
                    ax.plot(xs, ys, style, marker="o", label=f"{series[0]} {series[1]}")
                    drawn = True
                if not drawn:
                    plt.close(fig)
                    continue
                batches = sorted({(r["length"], r["batch"]) for r in rows})
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length L (B = " + ", ".join(f"{b}" for _, b in batches) + ")")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{direction} {dtype}, H={rows[0]['heads']} D={rows[0]['dim']} "
                             f"({rows[0].get('device', '')})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                path = out_dir / f"{metric}_{direction}_{dtype}.png"
                fig.savefig(path, dpi=120)
                plt.close(fig)
                written.append(path)
    return written


def run(arguments: argparse.Namespace) -> int:
    """The ``refattn bench`` command."""
    out_dir = Path(arguments.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = measure.machine_info()
    started = time.time()
    payload: dict[str, Any] = {"machine": machine, "config": {k: v for k, v in vars(arguments).items() if k != "run"}}
    if arguments.targets:
        from . import targets

        records = targets.run(dtype=arguments.dtype[0] if arguments.dtype else "float32", repeats=arguments.repeats,
                              device=arguments.device or "cpu")
        payload["targets"] = records
    else:
        results = sweep(
            backends=arguments.backend or cases.available_backends(),
            algorithms=arguments.algorithm or list(cases.ALGORITHMS),
            lengths=arguments.length or list(cases.LENGTHS),
            directions=arguments.direction or list(cases.DIRECTIONS),
            dtypes=arguments.dtype or ["float32"],
            repeats=arguments.repeats, warmup=arguments.warmup, tokens=arguments.tokens, batch=arguments.batch,
            heads=arguments.heads, dim=arguments.dim, top_k=arguments.top_k, clusters=arguments.clusters,
            window=arguments.window, profile=arguments.profile, device=arguments.device,
            dense_max_gflop=arguments.dense_max_gflop, max_seconds=arguments.max_seconds,
            memory=not arguments.no_memory, progress=not arguments.no_progress,
        )
        payload["results"] = results
        print(f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine.get('memory_gib', '?')} GiB, "
              f"load {machine.get('load_average', '?')}")
        print(table(results))
        if not arguments.no_plots:
            for path in plots(results, out_dir):
                print(f"plot: {path}")
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    payload["elapsed_s"] = time.time() - started
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"json: {json_path}")
    return 0
