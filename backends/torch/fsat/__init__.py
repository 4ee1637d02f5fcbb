"""FSAT on PyTorch tensors: the ``fsat`` namespace of spec/interface.md, one module per step of the
reference :mod:`refattn.fsat` (same names, keywords, defaults, shapes and tie-breaks).

Differs from the reference: tensors of one device (CPU or CUDA) in, tensors of the inputs' dtype out
(float16 and bfloat16 computed in float32 and cast back once); ``cross``, ``estimate``,
``sparse_attention`` and ``attention`` are differentiable with ``torch.autograd``, and ``attention``
works under ``torch.compile``; ``attention_with_offsets`` and ``candidate_order`` are additions.
Each function validates its arguments once (``check_f`` in its module, through
:mod:`refattn.checks`) and raises ``ValueError`` naming the user's arguments when a result
overflows the compute dtype.
"""

from .attention import FSATGrads, attention, attention_vjp, attention_with_offsets
from .cross import cross, cross_vjp, pair_counts
from .estimate import estimate, estimate_vjp
from .select import candidate_order, select
from .sparse_attention import sparse_attention, sparse_attention_vjp

__all__ = [
    "pair_counts",
    "cross",
    "cross_vjp",
    "estimate",
    "estimate_vjp",
    "select",
    "candidate_order",
    "sparse_attention",
    "sparse_attention_vjp",
    "attention",
    "attention_vjp",
    "attention_with_offsets",
    "FSATGrads",
]
