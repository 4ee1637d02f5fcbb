"""Routing attention on CuPy arrays: the ``routing`` namespace of the CuPy backend, one module per step of
:mod:`refattn.routing`."""

from refattn import routing as reference
from refattn.backends.layout import export_steps

__all__ = export_steps(reference, globals())
