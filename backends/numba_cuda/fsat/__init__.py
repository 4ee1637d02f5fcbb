"""FSAT on the device: the ``fsat`` namespace of the Numba-CUDA backend, one module per step of
:mod:`refattn.fsat` with the same names; each module's docstring says how it differs."""

from refattn import fsat as reference
from refattn.backends.layout import export_steps

__all__ = export_steps(reference, globals())
