"""Routing attention (spec/routing.md) on Numba-CUDA: NOT IMPLEMENTED YET in this backend.

Every kernel-backed function raises ``NotImplementedError`` naming itself (nothing here pretends to
work). Only the integer helpers ``default_num_clusters`` and ``default_window`` (host arithmetic, no
arrays), ``CentroidState`` and ``init_centroids`` (which draws from the caller's NumPy generator on
the host, exactly as the reference; spec/interface.md exempts it from cross-backend comparison) are
provided, delegating to the reference.
"""

from __future__ import annotations

from typing import Any

from refattn.routing import CentroidState, default_num_clusters, default_window
from refattn.routing import init_centroids as _reference_init_centroids

__all__ = ["normalize", "normalize_vjp", "similarity", "similarity_vjp", "route", "cluster_attention",
           "cluster_attention_vjp", "combine", "combine_vjp", "local_attention", "local_attention_vjp", "assign",
           "CentroidState", "init_centroids", "update_centroids", "commitment_loss", "commitment_loss_vjp",
           "attention", "attention_vjp", "default_num_clusters", "default_window"]

IMPLEMENTED = ("default_num_clusters", "default_window", "init_centroids")


def _missing(name: str):
    def function(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"numba_cuda: routing.{name} is not implemented yet in the Numba-CUDA backend "
                                  f"(issue 4); use the numpy or torch backend")
    function.__name__ = name
    function.__qualname__ = name
    function.__doc__ = f"Not implemented in the Numba-CUDA backend: raises NotImplementedError naming routing.{name}."
    return function


normalize = _missing("normalize")
normalize_vjp = _missing("normalize_vjp")
similarity = _missing("similarity")
similarity_vjp = _missing("similarity_vjp")
route = _missing("route")
cluster_attention = _missing("cluster_attention")
cluster_attention_vjp = _missing("cluster_attention_vjp")
combine = _missing("combine")
combine_vjp = _missing("combine_vjp")
local_attention = _missing("local_attention")
local_attention_vjp = _missing("local_attention_vjp")
assign = _missing("assign")
update_centroids = _missing("update_centroids")
commitment_loss = _missing("commitment_loss")
commitment_loss_vjp = _missing("commitment_loss_vjp")
attention = _missing("attention")
attention_vjp = _missing("attention_vjp")


def init_centroids(num_heads: int, num_clusters: int, dim: int, *, rng: Any, profile: str = "tacl") -> CentroidState:
    """The reference's ``init_centroids`` (host NumPy, the caller's generator); not compared across backends."""
    return _reference_init_centroids(num_heads, num_clusters, dim, rng=rng, profile=profile)
