"""The ``refattn`` command (also ``python -m refattn``).

- ``refattn info``: version, registered backends, whether each loads here, and the devices seen.
- ``refattn conformance [--backend NAME ...] [--json PATH]``: the conformance report.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

import numpy as np
import scipy

import refattn
from refattn import backends


def _info(_: argparse.Namespace) -> int:
    print(f"refattn {refattn.__version__} (Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__})")
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
    from refattn.conformance import runner

    return runner.main(arguments.backend, json_path=arguments.json, quick=arguments.quick)


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
    conformance.add_argument("--quick", action="store_true", help="the smallest shapes only")
    conformance.set_defaults(run=_conformance)
    arguments = parser.parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
