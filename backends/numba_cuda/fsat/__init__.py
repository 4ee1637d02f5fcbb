"""FSAT on the device: the ``fsat`` namespace of the Numba-CUDA backend, one module per step of
:mod:`refattn.fsat` with the same names; each module's docstring says how it differs."""

from .attention import FSATGrads, attention, attention_vjp
from .cross import cross, cross_vjp, pair_counts
from .estimate import estimate, estimate_vjp
from .select import select
from .sparse_attention import sparse_attention, sparse_attention_vjp

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "estimate",
    "estimate_vjp",
    "select",
    "sparse_attention",
    "sparse_attention_vjp",
    "attention",
    "attention_vjp",
    "FSATGrads",
]
