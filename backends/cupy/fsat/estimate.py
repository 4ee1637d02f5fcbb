"""FSAT step 2a on CuPy arrays: :mod:`refattn.fsat.estimate` in the compute dtype."""

from __future__ import annotations

import importlib

from ..device import Overflow, mirror

reference = importlib.import_module("refattn.fsat.estimate")

estimate = mirror(reference.estimate, reference.check_estimate, reference.estimate_core,
                  overflow=[Overflow("the estimate", ("c", "w"), allow_neg_inf=True)])

estimate_vjp = mirror(reference.estimate_vjp, reference.check_estimate_vjp, reference.estimate_vjp_core,
                      overflow=[Overflow("the gradient of the estimate", ("ds", "w")),
                                Overflow("the gradient of the estimate", ("ds", "c"))])
