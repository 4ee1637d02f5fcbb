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

from .attention import attention, attention_vjp, default_num_clusters, default_window
from .centroids import (
    CentroidState,
    apply_centroid_statistics,
    assign,
    centroid_statistics,
    init_centroids,
    update_centroids,
)
from .cluster_attention import cluster_attention, cluster_attention_vjp
from .combine import combine, combine_vjp
from .commitment import commitment_loss, commitment_loss_vjp
from .local_attention import local_attention, local_attention_vjp
from .normalize import normalize, normalize_vjp
from .route import route
from .similarity import similarity, similarity_vjp

__all__ = [
    "CentroidState",
    "apply_centroid_statistics",
    "assign",
    "attention",
    "attention_vjp",
    "centroid_statistics",
    "cluster_attention",
    "cluster_attention_vjp",
    "combine",
    "combine_vjp",
    "commitment_loss",
    "commitment_loss_vjp",
    "default_num_clusters",
    "default_window",
    "init_centroids",
    "local_attention",
    "local_attention_vjp",
    "normalize",
    "normalize_vjp",
    "route",
    "similarity",
    "similarity_vjp",
    "update_centroids",
]
