"""FSAT step 1 on CuPy arrays: :mod:`refattn.fsat.cross` with cuFFT (``cupyx.scipy.fft``), on groups of heads
(``pair_counts``: of batch rows) whose FFT buffers fit the chunk budget; ``pair_counts`` returns a device
array also without a mask."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import numpy as np

from refattn import checks

from .. import memory
from ..device import mirror, namespace, on_device

reference = importlib.import_module("refattn.fsat.cross")  # the module: refattn.fsat.cross is also a function


@on_device
@functools.wraps(reference.pair_counts)
def pair_counts(length: int, key_padding_mask: Any = None) -> Any:
    length, mask = reference.check_pair_counts(length, key_padding_mask)
    if mask is None:
        return reference.pair_counts_core(length, None, xp=namespace())
    xp = checks.array_namespace(mask)
    counts = xp.empty((mask.shape[0], 2 * length - 1), np.int64)
    rows = memory.per_chunk(memory.pair_counts_row(length))  # batch rows per chunk
    for start in range(0, mask.shape[0], rows):
        counts[start:start + rows] = reference.pair_counts_core(length, mask[start:start + rows])
    return counts


cross = mirror(reference.cross,
               head_bytes=lambda x, itemsize: memory.cross_head(x["a"].shape[2], x["a"].shape[3], itemsize))

cross_vjp = mirror(reference.cross_vjp,
                   head_bytes=lambda x, itemsize: memory.cross_vjp_head(x["a"].shape[2], x["a"].shape[3], itemsize))
