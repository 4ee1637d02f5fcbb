"""Routing step 5 on CuPy arrays: :mod:`refattn.routing.combine` in the compute dtype (its segmented sums
are ``cupy.add.at``, atomics on the device)."""

from __future__ import annotations

import importlib

from ..device import Overflow, mirror

reference = importlib.import_module("refattn.routing.combine")

combine = mirror(reference.combine, reference.check_combine, reference.combine_core,
                 overflow=[Overflow("the combination of the cluster outputs", ("o",))])

combine_vjp = mirror(reference.combine_vjp, reference.check_combine_vjp, reference.combine_vjp_core)
