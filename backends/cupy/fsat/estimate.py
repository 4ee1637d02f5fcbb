"""FSAT step 2a on CuPy arrays: :mod:`refattn.fsat.estimate` in the compute dtype."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.fsat.estimate")

estimate = mirror(reference.estimate)

estimate_vjp = mirror(reference.estimate_vjp)
