"""Routing step 1 on CuPy arrays: :mod:`refattn.routing.normalize` in the compute dtype."""

from __future__ import annotations

import importlib

from ..device import Overflow, mirror

reference = importlib.import_module("refattn.routing.normalize")

normalize = mirror(reference.normalize, reference.check_normalize, reference.normalize_core)

normalize_vjp = mirror(reference.normalize_vjp, reference.check_normalize_vjp, reference.normalize_vjp_core,
                       overflow=[Overflow("the gradient of the normalization", ("dx_hat",))])
