"""Routing step 7 on CuPy arrays: :mod:`refattn.routing.centroids` in the compute dtype, ``assign`` on groups of
heads; ``update_centroids`` holds the (B, H, L, C) similarities at once (its statistics sum over the batch and
the heads' tokens, in the reference's core); ``init_centroids``
draws on the host, as the reference (from the Generator it is given), and moves the state to the current
device."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from .. import memory
from ..device import mirror, namespace

reference = importlib.import_module("refattn.routing.centroids")
CentroidState = reference.CentroidState

assign = mirror(reference.assign,  # on groups of heads
                head_bytes=lambda x, itemsize: memory.assign_head(x["x_hat"].shape[2], x["x_hat"].shape[3],
                                                                  x["centroids"].shape[1], itemsize))

update_centroids = mirror(reference.update_centroids)


@functools.wraps(reference.init_centroids)
def init_centroids(num_heads: int, num_clusters: int, dim: int, *, rng: Any, profile: str = "tacl") -> CentroidState:
    state = reference.init_centroids(num_heads, num_clusters, dim, rng=rng, profile=profile)
    return CentroidState(*(namespace().asarray(x) for x in state))
