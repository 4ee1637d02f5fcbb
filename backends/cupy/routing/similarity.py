"""Routing step 2 on CuPy arrays: :mod:`refattn.routing.similarity` in the compute dtype (cuBLAS GEMMs)."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.routing.similarity")

similarity = mirror(reference.similarity)

similarity_vjp = mirror(reference.similarity_vjp)
