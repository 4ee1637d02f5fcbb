"""The ``refattn`` command (also ``python -m refattn``).

- ``refattn info``: version, registered backends, whether each loads here, and the devices seen.
- ``refattn conformance [--backend NAME ...] [--json PATH]``: the conformance report.
- ``refattn bench [--targets]``: time and memory against L, or the performance targets (:mod:`refattn.bench`).
- ``refattn quality --task NAME --attention NAME``: does it learn? (:mod:`refattn.quality`).
- ``refattn audit [--backend NAME ...] [--traffic]``: every CUDA launch planned for realistic shapes.

Every option is validated by its ``type=`` (:mod:`refattn.arguments`): a bad value is a usage error,
exit status 2, naming the option and what it expects.
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
from refattn import arguments as types  # the option validators; 'arguments' is the parsed namespace
from refattn import audit, backends
from refattn.bench import runner as bench_runner  # torch-free: the options and the command
from refattn.quality import runner as quality_runner  # torch-free: the options only

DESCRIPTION = ("refattn: the reference implementation, and verified backends, of FSAT and Routing attention. "
               "Run 'refattn COMMAND --help' for a command's options.")


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


def _checked_functions() -> list[str]:
    from refattn.conformance import runner  # imports no backend's library

    return runner.checked_functions()


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
    return bench_runner.run(arguments)


def _quality(arguments: argparse.Namespace) -> int:
    return quality_runner.run(arguments)


def build_parser() -> argparse.ArgumentParser:
    """The ``refattn`` command's parser: every subcommand and option (each value validated by its type)."""
    parser = argparse.ArgumentParser(prog="refattn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"refattn {refattn.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, backends and devices").set_defaults(run=_info)
    conformance = commands.add_parser(
        "conformance", help="check backends against the reference (default: every backend that loads here)"
    )
    conformance.add_argument("--backend", action="append", type=types.backend_name(), metavar="NAME",
                             help="a backend to check (repeatable)")
    conformance.add_argument("--json", type=types.output_file, metavar="PATH",
                             help="also write the report as JSON to PATH")
    conformance.add_argument("--quick", action="store_true",
                             help="the smallest shapes and a pairwise covering of the flags")
    conformance.add_argument("--algorithm", action="append", choices=("fsat", "routing"),
                             help="only this algorithm (repeatable; default both)")
    conformance.add_argument("--dtype", action="append", choices=types.DTYPES,
                             help="only this dtype (repeatable; default every dtype of the tolerance table)")
    conformance.add_argument("--function", action="append", type=types.one_of("function", _checked_functions),
                             metavar="NAME",
                             help="only the checks of this function, e.g. cluster_attention_vjp (repeatable)")
    conformance.add_argument("--part", action="append", choices=("base", "ties", "extreme", "large"),
                             help="only this part of the grid (repeatable; default all): the ordinary cases, "
                                  "deliberate ties, extreme values, large shapes")
    conformance.set_defaults(run=_conformance, parser=conformance)
    bench = commands.add_parser(
        "bench", help="time and peak memory of every backend and algorithm against L (table, JSON, plots), or the "
                      "performance targets (--targets)"
    )
    bench_runner.add_arguments(bench)
    bench.set_defaults(run=_bench, parser=bench)
    quality = commands.add_parser(
        "quality", help="does it learn? train small models with each attention on long-range tasks: table, curves"
    )
    quality_runner.add_arguments(quality)
    quality.set_defaults(run=_quality, parser=quality)
    audit.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refattn`` console script; returns the exit status."""
    arguments = build_parser().parse_args(argv)
    arguments.command_line = list(sys.argv[1:] if argv is None else argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
