"""Validated option values for the ``refattn`` subcommands: argparse ``type=`` helpers, one pattern for all.

Each helper returns a converter for ``add_argument(..., type=...)``; a bad value is then a usage
error (exit status 2) naming the option, what it expects and what came, before anything runs::

    parser.add_argument("--length", type=arguments.integer(1), action="append")   # an integer >= 1
    parser.add_argument("--max-seconds", type=arguments.number(0, open_low=True))  # a number > 0
    parser.add_argument("--backend", type=arguments.backend_name("lucidrains"))   # the registry's names
    parser.add_argument("--device", type=arguments.device)                         # cpu, cuda, cuda:N
    parser.add_argument("--dtype", choices=arguments.DTYPES)                       # fixed names: choices=

argparse prints ``refattn bench: error: argument --length: expected an integer >= 1, got '0'``. Fixed
names use argparse's own ``choices=`` (its message lists them); names known only at run time (the
registry's backends) use :func:`backend_name`. A check that involves several options (``--repeats``
with ``--targets``) belongs to the subcommand and ends in ``parser.error(message)``, which exits the
same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

DTYPES = ("float64", "float32", "bfloat16", "float16")
"""The dtype names every subcommand accepts (the conformance suite's tolerance table)."""

__all__ = ["DTYPES", "backend_name", "device", "integer", "number"]


def _bounds(low: float | None, high: float | None, open_low: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A converter to ``int`` accepting integers in ``[low, high]`` (None: unbounded); ``integer(1)`` is >= 1."""
    bounds = _bounds(low, high)
    expected = f"an integer {bounds}".rstrip()

    def convert(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    convert.__name__ = "integer"  # argparse names the type in some messages
    return convert


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False) -> Callable[[str], float]:
    """A converter to a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``open_low``; None: unbounded)."""
    bounds = _bounds(low, high, open_low)
    expected = f"a finite number {bounds}".rstrip()

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    convert.__name__ = "number"
    return convert


def backend_name(*extra: str) -> Callable[[str], str]:
    """A converter accepting a registered backend's name (read when the option is parsed) or one of ``extra``."""

    def convert(text: str) -> str:
        from refattn import backends

        names = [*backends.registered(), *extra]
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {', '.join(names)}")
        return text

    convert.__name__ = "backend"
    return convert


def device(text: str) -> str:
    """A device name: ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists here is checked when it is used)."""
    index = text[5:] if text.startswith("cuda:") else ""
    if text in ("cpu", "cuda") or (index.isdigit() and index.isascii()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
