"""Routing step 8 on CuPy arrays: :mod:`refattn.routing.commitment` in the compute dtype; the loss is read
back as a Python float, as the reference returns it (a host synchronisation)."""

from __future__ import annotations

import importlib

from ..device import Overflow, mirror

reference = importlib.import_module("refattn.routing.commitment")

commitment_loss = mirror(reference.commitment_loss, reference.check_commitment_loss, reference.commitment_loss_core,
                         overflow=[Overflow("the commitment loss", ("x_hat", "centroids"))])

commitment_loss_vjp = mirror(reference.commitment_loss_vjp, reference.check_commitment_loss_vjp,
                             reference.commitment_loss_vjp_core,
                             overflow=[Overflow("the gradient of the commitment loss", ("x_hat", "centroids"))])
