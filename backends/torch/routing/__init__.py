"""Routing attention on PyTorch tensors: the ``routing`` namespace of spec/interface.md, one module
per step of the reference :mod:`refattn.routing` (same names, keywords, defaults, shapes and
tie-breaks; the profiles are the reference's :mod:`refattn.routing.profiles`).

Differs from the reference: tensors of one device (CPU or CUDA) in, tensors of the inputs' dtype out
(float16 and bfloat16 computed in float32 and cast back once); vectorised over batch, heads and
clusters with no L x L tensor; ``attention``, ``cluster_attention``, ``combine``, ``local_attention``,
``normalize``, ``similarity`` and ``commitment_loss`` are differentiable with ``torch.autograd`` and
the ``*_vjp`` functions are autograd's VJPs of the same code. Additions: ``centroid_statistics`` and
``apply_centroid_statistics`` (``update_centroids`` in two steps, for data-parallel training);
``init_centroids`` also takes a ``torch.Generator``; ``commitment_loss`` is a 0-d tensor. Each
function validates its arguments once (``check_f`` in its module, through :mod:`refattn.checks`)
and raises ``ValueError`` naming the user's arguments when a result overflows the compute dtype.
"""

from refattn import routing as reference
from refattn.backends.layout import export_steps

from .centroids import apply_centroid_statistics, centroid_statistics

__all__ = [*export_steps(reference, globals()), "centroid_statistics", "apply_centroid_statistics"]
