"""FSAT step 2b on CuPy arrays: :mod:`refattn.fsat.select` on float64 scores, as the reference compares them
(its choices are then the reference's), on groups of heads (its sort keys and indices are 64-bit)."""

import importlib

import numpy as np

from .. import memory
from ..device import mirror

reference = importlib.import_module("refattn.fsat.select")

select = mirror(reference.select, compute=np.dtype(np.float64),
                head_bytes=lambda x, itemsize: memory.select_head(x["s"].shape[2]))
