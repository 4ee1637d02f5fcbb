"""Routing step 5 on CuPy arrays: :mod:`refattn.routing.combine` in the compute dtype (its segmented sums
are ``cupy.add.at``, atomics on the device)."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.routing.combine")

combine = mirror(reference.combine)

combine_vjp = mirror(reference.combine_vjp)
