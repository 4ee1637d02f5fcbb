"""C++ built on this machine with g++ and loaded with ctypes: the one build step of the torch backend's CPU
kernels and of the CUDA C emulation (:mod:`refattn.backends.cuda_emulation`).

A library is compiled once per content, flags, compiler and CPU, and kept in :func:`cache_directory`
under a hash of all four: a cache shared by machines of different CPUs never hands one of them code
built with another's ``-march=native``. Builds land atomically, so concurrent processes may build the
same library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COMPILER", "CompileError", "build", "cache_directory", "compiler"]

COMPILER = "g++"


class CompileError(RuntimeError):
    """g++ is missing or rejected the source (the message holds its log)."""


def cache_directory(kind: str) -> Path:
    """Where builds of ``kind`` are kept: $REFATTN_CACHE_DIR/kind, else $XDG_CACHE_HOME/refattn/kind, else
    ~/.cache/refattn/kind."""
    if os.environ.get("REFATTN_CACHE_DIR"):
        return Path(os.environ["REFATTN_CACHE_DIR"]) / kind
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "refattn" / kind


def compiler(purpose: str) -> str:
    """The path of g++; ``CompileError`` saying what needs it (``purpose``) when it is not on PATH."""
    path = shutil.which(COMPILER)
    if path is None:
        raise CompileError(f"building {purpose} needs {COMPILER} (12 or later) on PATH; none found")
    return path


@functools.cache
def _identity(path: str) -> str:
    """The compiler's version and this CPU's feature flags: what a build's machine code depends on."""
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return version + flags


def build(source: str, flags: Sequence[str], *, kind: str, purpose: str, includes: Sequence[Path] = ()) -> Path:
    """The shared library of the C++ ``source`` compiled with ``flags`` (besides -shared -fPIC), built once and
    kept in ``cache_directory(kind)``; ``includes``: the files it includes, copied beside it (``#include "name.h"``
    finds them) and part of the key.
    ``CompileError`` with g++'s log (``purpose`` says what was built)."""
    path = compiler(purpose)
    texts = [Path(name).read_text() for name in includes]
    key = hashlib.sha256("\0".join([source, *texts, *flags, _identity(path)]).encode())
    folder = cache_directory(kind)
    target = folder / f"{key.hexdigest()[:32]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        cpp, library = Path(scratch) / "source.cpp", Path(scratch) / "library.so"
        cpp.write_text(source)
        for name, text in zip(includes, texts, strict=True):
            (Path(scratch) / Path(name).name).write_text(text)
        command = [path, "-shared", "-fPIC", *flags, str(cpp), "-o", str(library)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if result.returncode != 0:
            raise CompileError(f"g++ could not compile {purpose}:\n{result.stderr}")
        os.replace(library, target)  # atomic: concurrent builders of one key leave one complete file
    return target
