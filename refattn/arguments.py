"""Validated option values for the ``refattn`` subcommands: argparse ``type=`` helpers, one pattern for all.

Each helper returns a converter for ``add_argument(..., type=...)``; a bad value is then a usage
error (exit status 2) naming the option, what it expects and what came, before anything runs::

    parser.add_argument("--length", type=arguments.integer(1), action="append")   # an integer >= 1
    parser.add_argument("--max-seconds", type=arguments.number(0, open_low=True))  # a number > 0
    parser.add_argument("--backend", type=arguments.backend_name("lucidrains"))   # the registry's names
    parser.add_argument("--device", type=arguments.device)                         # cpu, cuda, cuda:N
    parser.add_argument("--dtype", choices=arguments.DTYPES)                       # fixed names: choices=
    parser.add_argument("--json", type=arguments.output_file)                      # a file that can be written
    parser.add_argument("--out", type=arguments.output_directory)                  # a folder that can be made

argparse prints ``refattn bench: error: argument --length: expected an integer >= 1, got 0``. Fixed
names use argparse's own ``choices=`` (its message lists them); names known only at run time (the
registry's backends, the conformance suite's functions) use :func:`one_of`. Paths are checked before
anything runs, so that a long run does not end in a traceback when it writes its results. A check that
involves several options (``--repeats`` with ``--targets``) belongs to the subcommand and ends in
``parser.error(message)``, which exits the same way.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

DTYPES = ("float64", "float32", "bfloat16", "float16")
"""The dtype names every subcommand accepts (the conformance suite's tolerance table)."""

__all__ = ["DTYPES", "backend_name", "device", "integer", "number", "one_of", "output_directory", "output_file"]


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


def one_of(what: str, names: Callable[[], Iterable[str]]) -> Callable[[str], str]:
    """A converter accepting one of ``names()``, read when the option is parsed (names known only at run time)."""

    def convert(text: str) -> str:
        known = list(names())
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(known)}")
        return text

    convert.__name__ = what
    return convert


def backend_name(*extra: str) -> Callable[[str], str]:
    """A converter accepting a registered backend's name or one of ``extra``."""

    def names() -> list[str]:
        from refattn import backends

        return [*backends.registered(), *extra]

    return one_of("backend", names)


def backend_here(what: str, names: Callable[[], Iterable[str]]) -> Callable[[str], str]:
    """A converter accepting a backend among ``names()`` (those that load here and have ``what``); the error
    says whether another name is registered but unusable here or not registered at all."""

    def convert(text: str) -> str:
        from refattn import backends

        known = sorted(names())
        if text not in known:
            why = "registered, but its library is missing here" if text in backends.registered() else "not registered"
            raise argparse.ArgumentTypeError(f"{text!r} has no {what} here ({why}); choose from: "
                                             f"{', '.join(known) or 'none'}")
        return text

    convert.__name__ = "backend"
    return convert


def device(text: str) -> str:
    """A device name: ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists here is checked when it is used)."""
    index = text[5:] if text.startswith("cuda:") else ""
    if text in ("cpu", "cuda") or (index.isdigit() and index.isascii()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _writable_parent(path: Path) -> str | None:
    """Why the folders up to ``path`` cannot be made, or None: the nearest existing one must be a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(parent)!r} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{str(parent)!r} is not writable"
    return None


def output_file(text: str) -> str:
    """A path a file can be written to: not a folder, its missing folders can be made (the writer makes them)."""
    path = Path(text)
    problem = "it is a folder" if path.is_dir() else _writable_parent(path)
    if problem is None and path.exists() and not os.access(path, os.W_OK):
        problem = "it is not writable"
    if problem:
        raise argparse.ArgumentTypeError(f"expected a file path that can be written, got {text!r}: {problem}")
    return text


def output_directory(text: str) -> str:
    """A folder that exists or can be made (with its missing parents), and is writable."""
    path = Path(text)
    if path.exists():
        problem = None if path.is_dir() else "it is a file"
        if problem is None and not os.access(path, os.W_OK | os.X_OK):
            problem = "it is not writable"
    else:
        problem = _writable_parent(path)
    if problem:
        raise argparse.ArgumentTypeError(f"expected a folder that exists or can be made, got {text!r}: {problem}")
    return text
