"""Routing step 8 on CuPy arrays: :mod:`refattn.routing.commitment` in the compute dtype; the loss is read
back as a Python float, as the reference returns it (a host synchronisation)."""

import importlib

from ..device import mirror

reference = importlib.import_module("refattn.routing.commitment")

commitment_loss = mirror(reference.commitment_loss)

commitment_loss_vjp = mirror(reference.commitment_loss_vjp)
