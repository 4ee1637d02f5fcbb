"""Routing step 1 on CuPy arrays: :mod:`refattn.routing.normalize` in the compute dtype."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.routing.normalize")

normalize = mirror(reference.normalize)

normalize_vjp = mirror(reference.normalize_vjp)
