"""Routing step 4 on CuPy arrays: :mod:`refattn.routing.cluster_attention` in the compute dtype, on groups
of heads whose logits, gathers and gradient buffers fit the chunk budget (the reference's scatter of
the gradients then fills buffers of one group, not of all (B, H, L) rows, per chunk of clusters)."""

from __future__ import annotations

import importlib

from .. import memory
from ..device import Overflow, mirror

reference = importlib.import_module("refattn.routing.cluster_attention")


def _head_bytes(x: dict, itemsize: int, *, gradient: bool) -> int:
    (_, _, length, dim), (_, _, clusters, window) = x["q"].shape, x["q_members"].shape
    return memory.cluster_head(length, dim, x["v"].shape[3], clusters, window, itemsize, gradient=gradient)


cluster_attention = mirror(reference.cluster_attention, reference.check_cluster_attention,
                           reference.cluster_attention_core, overflow=[Overflow("the cluster attention", ("q", "k"))],
                           head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=False))

_gradient = "the gradient of the cluster attention"
cluster_attention_vjp = mirror(reference.cluster_attention_vjp, reference.check_cluster_attention_vjp,
                               reference.cluster_attention_vjp_core,
                               overflow=[Overflow(_gradient, ("do", "v", "q", "k")),
                                         Overflow(_gradient, ("do", "v", "q", "k")), Overflow(_gradient, ("do",))],
                               head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=True))
