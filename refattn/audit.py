"""``refattn audit``: CUDA's launch limits and each function's device-memory bound, checked without a GPU.

Every backend that launches CUDA kernels states its launches as plans (``Backend.plans``, the types
of :mod:`refattn.backends.launch`), computed by the same code that launches them. The audit asks
each such backend for the plans of every function at a table of realistic shapes (:func:`shapes`:
B·H from 1 to 65,536, L from 1 to 1,048,576, D 64 and 128, K 16, C = W up to 256) in float32 and
float64, checks every launch against CUDA's limits (grid, block, shared memory, 64-bit indexing
past 2^31) and every planned device-memory peak against the bound the function states, prints a
table and exits 1 on any violation. ``--traffic`` prints every launch of one shape with its
memory-traffic model (the bytes a profiler's DRAM counters are to be compared with).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from typing import Any

from refattn import arguments as types  # the option validators; 'arguments' is the parsed namespace
from refattn.backends import Backend, availability, get_backend
from refattn.backends.launch import FunctionPlan, Shape

__all__ = ["shapes", "TRAFFIC_SHAPE", "auditable", "plan_all", "add_parser", "run"]

DTYPES = ("float32", "float64")
# (B, H, L): one token, short and long sequences, 2^20 tokens per head, and B·H = 65,536 heads; at most
# 2^24 tokens (B·H·L), the largest batch that fits a GPU's memory in q, k, v and their gradients
BATCH_HEADS_LENGTHS = ((1, 1, 1), (1, 1, 7), (2, 8, 4_096), (1, 8, 65_536), (1, 8, 1_048_576), (1, 16, 1_048_576),
                       (4_096, 16, 1), (4_096, 16, 256))
TRAFFIC_SHAPE = Shape(1, 8, 65_536, 64, 64, top_k=16, clusters=256, window=256)
MIB = 1 << 20


def _clusters(length: int) -> int:
    """C = W = round(sqrt(L)) (the default number of clusters), at most 256."""
    return max(1, min(256, round(math.sqrt(length))))


def shapes() -> list[Shape]:
    """The audit's table: every (B, H, L) of BATCH_HEADS_LENGTHS at D = Dv = 64 and 128, K = 16, C = W."""
    table = []
    for batch, heads, length in BATCH_HEADS_LENGTHS:
        for dim in (64, 128):
            c = _clusters(length)
            table.append(Shape(batch, heads, length, dim, dim, top_k=16, clusters=c, window=min(c, length)))
    return table


def auditable() -> dict[str, Backend]:
    """Every backend that loads here and has launch plans, by name."""
    found: dict[str, Backend] = {}
    for name, reason in availability().items():
        if reason is not None:
            continue
        backend = get_backend(name)
        if backend.plans is not None:
            found[name] = backend
    return found


def plan_all(backends: Iterable[Backend], table: Sequence[Shape], dtypes: Sequence[str],
             functions: Sequence[str] | None = None) -> list[FunctionPlan]:
    """Every plan of every backend for every shape and dtype (only ``functions`` when given)."""
    plans = []
    for backend in backends:
        for dtype in dtypes:
            for shape in table:
                plans.extend(plan for plan in backend.plans(shape, dtype)
                             if functions is None or plan.function in functions)
    return plans


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:,.1f} MiB" if nbytes >= MIB else f"{nbytes / 1024:,.1f} KiB"


def _row(plan: FunctionPlan) -> list[str]:
    launches = plan.launches
    grid_x = max((launch.grid[0] for launch in launches), default=0)
    grid_yz = max((max(launch.grid[1:]) for launch in launches), default=0)
    threads = max((math.prod(launch.block) for launch in launches), default=0)
    shared = max((launch.static_shared_bytes + launch.dynamic_shared_bytes for launch in launches), default=0)
    index = max((launch.largest_index for launch in launches), default=0)
    narrow = any(not launch.wide_indices for launch in launches)
    return [plan.backend, plan.function, plan.dtype, plan.shape.label(), str(len(launches)), f"{grid_x:,}",
            f"{grid_yz:,}", str(threads), _size(shared), f"{index:.2e}" + (" (32-bit)" if narrow else ""),
            f"{_size(plan.peak_bytes)} / {_size(plan.bound_bytes)}", "ok" if not plan.violations() else "VIOLATION"]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_plans(plans: Sequence[FunctionPlan]) -> None:
    """One row per function, dtype and shape: its launches' largest grid, block, shared memory and index,
    and its device-memory peak against its bound."""
    header = ["backend", "function", "dtype", "shape", "launches", "max grid.x", "max grid.y|z", "threads/block",
              "shared", "largest index", "peak / bound", "verdict"]
    _print_table(header, [_row(plan) for plan in plans])


def print_traffic(plans: Sequence[FunctionPlan]) -> None:
    """Every launch of every plan (one shape): grid, block, shared memory and its traffic model, and each
    function's total traffic."""
    header = ["backend", "function", "kernel", "launches", "grid", "block", "shared", "bytes moved"]
    rows = []
    for plan in plans:
        merged: dict[tuple[Any, ...], list[Any]] = {}
        for launch in plan.launches:  # identical launches (FFT chunks and passes) in one row
            key = (launch.kernel, launch.grid, launch.block, launch.static_shared_bytes + launch.dynamic_shared_bytes)
            merged.setdefault(key, [0, 0])
            merged[key][0] += 1
            merged[key][1] += launch.bytes_moved
        for (kernel, grid, block, shared), (count, moved) in merged.items():
            rows.append([plan.backend, plan.function, kernel, str(count), "x".join(map(str, grid)),
                         "x".join(map(str, block)), _size(shared), f"{moved:,}"])
        total = sum(launch.bytes_moved for launch in plan.launches)
        rows.append([plan.backend, plan.function, "(total)", str(len(plan.launches)), "", "", "", f"{total:,}"])
    _print_table(header, rows)


def _planned_functions() -> list[str]:
    """Every function some auditable backend plans (the names of its plans at the smallest shape)."""
    return sorted({plan.function for backend in auditable().values() for plan in backend.plans(Shape(1, 1, 1, 1, 1),
                                                                                                 DTYPES[0])})


def add_parser(commands: Any) -> None:
    """Register ``refattn audit`` on the CLI's subcommands."""
    parser = commands.add_parser("audit", help="CUDA launch limits and device-memory bounds of every kernel launch, "
                                               "planned for realistic shapes without a GPU")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        type=types.backend_here("launch plans", auditable),
                        help="a backend with launch plans (repeatable; default: every one that loads here)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="(repeatable; default: both)")
    parser.add_argument("--function", action="append", metavar="NAME",
                        type=types.one_of("function", _planned_functions),
                        help="only this function, e.g. fsat.attention (repeatable)")
    parser.add_argument("--traffic", action="store_true",
                        help=f"instead of the table: every launch at {TRAFFIC_SHAPE.label()} with its memory-traffic "
                             "model (float32 unless --dtype)")
    parser.set_defaults(run=run, parser=parser)


def run(arguments: argparse.Namespace) -> int:
    """Run the audit the CLI asked for; the exit status (1 on any violation; usage errors exit 2)."""
    found = auditable()
    backends = [found[name] for name in (arguments.backend or sorted(found))]
    dtypes = arguments.dtype or (["float32"] if arguments.traffic else list(DTYPES))
    table = [TRAFFIC_SHAPE] if arguments.traffic else shapes()
    plans = plan_all(backends, table, dtypes, arguments.function)
    (print_traffic if arguments.traffic else print_plans)(plans)
    violations = [(plan, problem) for plan in plans for problem in plan.violations()]
    for plan, problem in violations:
        print(f"VIOLATION {plan.backend} {plan.function} {plan.dtype} {plan.shape.label()}: {problem}")
    launches = sum(len(plan.launches) for plan in plans)
    print(f"{len(plans)} function plans of {', '.join(b.name for b in backends) or 'no backend'} "
          f"({launches:,} launches) over {len(table)} shapes x {len(dtypes)} dtypes: {len(violations)} violations")
    return 1 if violations else 0
