"""FSAT on CuPy arrays: the ``fsat`` namespace of the CuPy backend, one module per step of :mod:`refattn.fsat`."""

from .attention import FSATGrads, attention, attention_vjp
from .cross import cross, cross_vjp, pair_counts
from .estimate import estimate, estimate_vjp
from .select import select
from .sparse_attention import sparse_attention, sparse_attention_vjp

__all__ = ["pair_counts", "cross", "cross_vjp", "estimate", "estimate_vjp", "select", "sparse_attention",
           "sparse_attention_vjp", "attention", "attention_vjp", "FSATGrads"]
