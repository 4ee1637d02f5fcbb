"""Routing attention on CuPy arrays: the ``routing`` namespace of the CuPy backend, one module per step of
:mod:`refattn.routing`."""

from .attention import attention, attention_vjp, default_num_clusters, default_window
from .centroids import CentroidState, assign, init_centroids, update_centroids
from .cluster_attention import cluster_attention, cluster_attention_vjp
from .combine import combine, combine_vjp
from .commitment import commitment_loss, commitment_loss_vjp
from .local_attention import local_attention, local_attention_vjp
from .normalize import normalize, normalize_vjp
from .route import route
from .similarity import similarity, similarity_vjp

__all__ = ["normalize", "normalize_vjp", "similarity", "similarity_vjp", "route", "cluster_attention",
           "cluster_attention_vjp", "combine", "combine_vjp", "local_attention", "local_attention_vjp", "assign",
           "CentroidState", "init_centroids", "update_centroids", "commitment_loss", "commitment_loss_vjp",
           "attention", "attention_vjp", "default_num_clusters", "default_window"]
