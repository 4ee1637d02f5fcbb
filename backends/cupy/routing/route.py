"""Routing step 3 on CuPy arrays: :mod:`refattn.routing.route` on the similarities as given (no cast: the
comparisons of their own dtype are those of the reference's float64 promotion, so the members are the
reference's). Its partition works on one head's rows at a time: no sort of all B·H·C·L similarities."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.routing.route")

route = mirror(reference.route, compute=False)
