"""The ``refattn`` command (also ``python -m refattn``).

- ``refattn info``: version, registered backends, whether each loads here, and the devices seen.
- ``refattn conformance [--backend NAME ...] [--json PATH]``: the conformance report.
- ``refattn bench``: time and memory of every backend against L.
- ``refattn quality --task NAME --attention NAME``: does it learn? (:mod:`refattn.quality`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence

import numpy as np
import scipy

import refattn
from refattn import backends
from refattn.quality import runner as quality_runner  # torch-free: the options only


def _info(_: argparse.Namespace) -> int:
    print(f"refattn {refattn.__version__} (Python {platform.python_version()}, NumPy {np.__version__}, "
          f"SciPy {scipy.__version__})")
    print(f"selected backend (REFATTN_BACKEND): {refattn.SELECTED_BACKEND}")
    print("backends:")
    for name, origin in backends.registered().items():
        try:
            backend = backends.get_backend(name)
        except (ImportError, TypeError) as error:
            print(f"  {name:<11} {origin:<10} not available: {error}")
            continue
        capabilities = backend.capabilities
        devices = ", ".join(capabilities.devices) or f"none ({capabilities.unavailable})"
        print(f"  {name:<11} {origin:<10} available; devices: {devices}; dtypes: {', '.join(capabilities.dtypes)}")
        if backend.status:
            print(f"  {'':<11} {'':<10} {backend.status}")
    return 0


def _conformance(arguments: argparse.Namespace) -> int:
    # The checks' arrays are tiny: intra-op threads only add synchronisation, which on a loaded machine
    # costs milliseconds per call (torch's FFTs). Set before any backend's library is imported; a
    # value already in the environment wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from refattn.conformance import runner

    try:
        runner.check_arguments(arguments.backend or (), arguments.algorithm, arguments.function)
    except ValueError as error:  # UnknownBackendError is a ValueError
        arguments.parser.error(str(error))
    return runner.main(arguments.backend, json_path=arguments.json, quick=arguments.quick,
                       algorithms=arguments.algorithm, dtypes=arguments.dtype, functions=arguments.function,
                       parts=arguments.part)


def _bench(arguments: argparse.Namespace) -> int:
    from refattn.bench import runner

    return runner.run(arguments)


def _quality(arguments: argparse.Namespace) -> int:
    return quality_runner.run(arguments)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refattn`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="refattn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, backends and devices").set_defaults(run=_info)
    conformance = commands.add_parser(
        "conformance", help="check backends against the reference (default: every backend that loads here)"
    )
    conformance.add_argument("--backend", action="append", metavar="NAME", help="a backend to check (repeatable)")
    conformance.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    conformance.add_argument("--quick", action="store_true",
                             help="the smallest shapes and a pairwise covering of the flags")
    conformance.add_argument("--algorithm", action="append", choices=("fsat", "routing"),
                             help="only this algorithm (repeatable; default both)")
    conformance.add_argument("--dtype", action="append", choices=("float64", "float32", "bfloat16", "float16"),
                             help="only this dtype (repeatable; default every dtype of the tolerance table)")
    conformance.add_argument("--function", action="append", metavar="NAME",
                             help="only the checks of this function, e.g. cluster_attention_vjp (repeatable)")
    conformance.add_argument("--part", action="append", choices=("base", "ties", "extreme", "large"),
                             help="only this part of the grid (repeatable; default all): the ordinary cases, "
                                  "deliberate ties, extreme values, large shapes")
    conformance.set_defaults(run=_conformance, parser=conformance)
    bench = commands.add_parser(
        "bench", help="time and peak memory of every backend and algorithm against L: table, JSON, PNG plots"
    )
    bench.add_argument("--backend", action="append", metavar="NAME",
                       help="backend (repeatable; default: all, and the peer 'lucidrains')")
    bench.add_argument("--algorithm", action="append", choices=("fsat", "routing", "dense"),
                       help="(repeatable; default: all)")
    bench.add_argument("--length", action="append", type=int, metavar="L",
                       help="(repeatable; default: 1024 4096 16384 65536)")
    bench.add_argument("--direction", action="append", choices=("fwd", "bwd", "fwdbwd"),
                       help="(repeatable; default: all)")
    bench.add_argument("--dtype", action="append", metavar="DTYPE",
                       help="float32 (default), float64, bfloat16, float16 (repeatable)")
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per case (median and IQR reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    bench.add_argument("--max-seconds", type=float, default=60.0, help="stop timing a case after this many seconds")
    bench.add_argument("--tokens", type=int, default=16384, help="B = max(1, tokens // L)")
    bench.add_argument("--batch", type=int, help="fixed B instead of the token budget")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--dim", type=int, default=64)
    bench.add_argument("--top-k", type=int, default=16, help="FSAT's K")
    bench.add_argument("--clusters", type=int, help="routing C (default round(sqrt(L)))")
    bench.add_argument("--window", type=int, help="routing W (default ceil(L / C))")
    bench.add_argument("--profile", default="lucidrains", help="routing profile (lucidrains: the peer's function)")
    bench.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    bench.add_argument("--dense-max-gflop", type=float, default=2500.0, help="skip dense cases above this many GFLOP")
    bench.add_argument("--out", default="bench-results", metavar="DIR", help="where bench.json and the plots go")
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--targets", action="store_true",
                       help="measure the performance targets (FSAT vs dense, FSAT scaling, routing vs lucidrains, "
                            "NumPy vs torch) instead of a sweep")
    bench.set_defaults(run=_bench)
    quality = commands.add_parser(
        "quality", help="does it learn? train small models with each attention on long-range tasks: table, curves"
    )
    quality_runner.add_arguments(quality)
    quality.set_defaults(run=_quality, parser=quality)
    arguments = parser.parse_args(argv)
    arguments.command_line = list(sys.argv[1:] if argv is None else argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
