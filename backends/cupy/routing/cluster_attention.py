"""Routing step 4 on CuPy arrays: :mod:`refattn.routing.cluster_attention` in the compute dtype, on groups
of heads whose logits, gathers and gradient buffers fit the chunk budget (the reference's scatter of
the gradients then fills buffers of one group, not of all (B, H, L) rows, per chunk of clusters)."""

from __future__ import annotations

import importlib

from .. import memory
from ..device import mirror

reference = importlib.import_module("refattn.routing.cluster_attention")


def _head_bytes(x: dict, itemsize: int, *, gradient: bool) -> int:
    (_, _, length, dim), (_, _, clusters, window) = x["q"].shape, x["q_members"].shape
    return memory.cluster_head(length, dim, x["v"].shape[3], clusters, window, itemsize, gradient=gradient)


cluster_attention = mirror(reference.cluster_attention,
                           head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=False))

cluster_attention_vjp = mirror(reference.cluster_attention_vjp,
                               head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=True))
