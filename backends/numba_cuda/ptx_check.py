"""Compile every kernel of the Numba-CUDA backend to PTX, without a GPU:
``python -m refattn.backends.numba_cuda.ptx_check``.

Each kernel is compiled with ``numba.cuda.compile_ptx`` and its explicit float32 and float64
signatures for every requested compute capability (default sm_80 and sm_90). This catches the
type errors that the CUDA simulator (which runs the kernels as Python) cannot, and checks that the
static shared memory each kernel declares in the registry (the figure ``refattn audit`` checks
against CUDA's 48 KiB) is the shared memory its PTX declares. Needs numba-cuda and NVRTC
(``pip install nvidia-cuda-nvrtc-cu12``); must run with the simulator off. Exit status 1 if any
kernel fails to compile or its shared memory differs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SHARED = re.compile(r"^\s*(?:\.visible\s+)?\.shared\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\];", re.MULTILINE)


def shared_bytes(ptx: str) -> int:
    """The static shared memory the PTX of one kernel declares, in bytes."""
    return sum(int(size) for size in SHARED.findall(ptx))


def check(capabilities: tuple[tuple[int, int], ...] = ((8, 0), (9, 0)),
          dtypes: tuple[str, ...] = ("float32", "float64"),
          workers: int | None = None) -> list[tuple[str, str, str, str | None]]:
    """(kernel, dtype, sm, error or None) for every kernel, dtype and compute capability, each dtype compiled
    by its own process when there are ``workers`` (default: as many as dtypes and CPUs allow) > 1; a
    compilation is single-threaded Python and takes seconds."""
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        raise RuntimeError("the PTX check needs the real numba.cuda: unset NUMBA_ENABLE_CUDASIM")
    workers = workers or min(len(dtypes), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(check, [capabilities] * len(dtypes), [(dtype,) for dtype in dtypes], [1] * len(dtypes))
            return [result for part in parts for result in part]
    from refattn.backends.numba_cuda import kernels

    results = []
    for dtype in dtypes:
        dt = kernels.NUMBA_TYPES[dtype]
        for name, entry in kernels.python_kernels(dtype).items():
            for cc in capabilities:
                try:
                    ptx, _ = cuda.compile_ptx(entry.function, kernels.signature(entry.spec, dt), cc=cc)
                    declared = shared_bytes(ptx)
                    error = None if ".entry" in ptx else "no .entry in the PTX"
                    if error is None and declared != entry.shared_bytes:
                        error = f"the PTX declares {declared} B of shared memory, the registry {entry.shared_bytes} B"
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                results.append((name, dtype, f"sm_{cc[0]}{cc[1]}", error))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", nargs="*", default=["8.0", "9.0"], help="compute capabilities, e.g. 8.0 9.0")
    args = parser.parse_args(argv)
    ccs = tuple(tuple(int(part) for part in cc.split(".")) for cc in args.cc)
    started = time.perf_counter()
    results = check(ccs)
    failed = [r for r in results if r[3]]
    for name, dtype, sm, error in results:
        print(f"{'FAIL' if error else 'ok  '} {name:28s} {dtype:8s} {sm}" + (f"  {error}" if error else ""))
    kernels = len({r[0] for r in results})
    print(f"{len(results) - len(failed)} of {len(results)} compilations passed ({kernels} kernels x "
          f"{len({r[1] for r in results})} dtypes x {len(ccs)} targets) in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
