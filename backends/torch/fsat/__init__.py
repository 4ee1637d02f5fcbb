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

from refattn import fsat as reference
from refattn.backends.layout import export_steps

from .attention import attention_with_offsets
from .select import candidate_order

__all__ = [*export_steps(reference, globals()), "candidate_order", "attention_with_offsets"]
