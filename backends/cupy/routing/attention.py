"""Routing end to end on CuPy arrays: :mod:`refattn.routing.attention`'s checks, then its ``attention_core``
(and ``attention_vjp_core``) in the compute dtype on groups of heads: every step is independent per
(batch, head), so the (B, H, L, C) similarities, the members' sort buffers and the cluster logits exist
for one group at a time."""

from __future__ import annotations

import importlib

from .. import memory
from ..device import mirror

reference = importlib.import_module("refattn.routing.attention")
default_num_clusters, default_window = reference.default_num_clusters, reference.default_window


def _head_bytes(x: dict, itemsize: int, *, gradient: bool) -> int:
    _, _, length, dim = x["q"].shape
    return memory.routing_head(length, dim, x["v"].shape[3], x["centroids"].shape[1], x["window"], itemsize,
                               gradient=gradient)


attention = mirror(reference.attention, head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=False))

attention_vjp = mirror(reference.attention_vjp, head_bytes=lambda x, itemsize: _head_bytes(x, itemsize, gradient=True))
