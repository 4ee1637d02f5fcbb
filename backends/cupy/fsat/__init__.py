"""FSAT on CuPy arrays: the ``fsat`` namespace of the CuPy backend, one module per step of :mod:`refattn.fsat`."""

from refattn import fsat as reference
from refattn.backends.layout import export_steps

__all__ = export_steps(reference, globals())
