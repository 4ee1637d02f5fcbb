"""Routing attention on the device: the ``routing`` namespace of the Numba-CUDA backend, one module per
step of :mod:`refattn.routing` with the same names; each module's docstring says how it differs."""

from refattn import routing as reference
from refattn.backends.layout import export_steps

__all__ = export_steps(reference, globals())
