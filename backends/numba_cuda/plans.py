"""Every launch of the Numba-CUDA backend, planned for a shape without a device (``Backend.plans``).

Each public function that launches kernels is run here through its own device core with a
:class:`~.runtime.Planner`: the same host code, the same plan of every launch, but arrays that are
only shapes and dtypes, launches that are recorded, and allocations that are counted. The planned
device-memory peak (beyond the inputs) is held to a bound stated per function in terms of the
shape: its outputs and the intermediates the reference also keeps, plus the bounded chunk buffers
(FFT rows, selection keys). What ``refattn audit`` checks is what the call would launch.

FSAT functions are planned with a padding mask (the larger plan: the masked pair counts are an FFT;
``fsat.pair_counts`` is planned both ways), routing's with one where they take one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.backends.launch import FunctionPlan, Shape
from refattn.routing import CentroidState
from refattn.routing.profiles import get_profile

from .fft import BUFFERS, fft_plan
from .fsat.attention import attention_core as fsat_attention_core
from .fsat.attention import attention_vjp_core as fsat_attention_vjp_core
from .fsat.cross import Pairs, cross_core, cross_vjp_core, pair_counts_core, pairs
from .fsat.estimate import estimate_core, estimate_vjp_core
from .fsat.select import select_core
from .fsat.sparse_attention import sparse_attention_core, sparse_attention_vjp_core
from .routing.attention import attention_core as routing_attention_core
from .routing.attention import attention_vjp_core as routing_attention_vjp_core
from .routing.centroids import assign_core, update_centroids_core
from .routing.cluster_attention import cluster_attention_core, cluster_attention_vjp_core
from .routing.combine import combine_core, combine_vjp_core
from .routing.commitment import commitment_loss_core, commitment_loss_vjp_core
from .routing.local_attention import local_attention_core, local_attention_vjp_core
from .routing.normalize import normalize_core, normalize_vjp_core
from .routing.route import padding_flags, route_core
from .routing.similarity import similarity_core, similarity_vjp_core
from .runtime import Planner
from .topk import TOPK_BUDGET_BYTES

__all__ = ["plans", "plan", "inputs", "FUNCTIONS"]

@dataclass(frozen=True)
class Sizes:
    """A shape's sizes and the byte counts the bounds are stated in."""

    shape: Shape
    itemsize: int

    @property
    def k_eff(self) -> int:
        return min(self.shape.top_k, 2 * self.shape.length - 1)

    def seq(self, features: int) -> int:
        """(B, H, L, features) in the compute dtype."""
        s = self.shape
        return s.batch * s.heads * s.length * features * self.itemsize

    def offsets(self, features: int) -> int:
        """(B, H, 2L - 1, features) in the compute dtype (the cross, the scores)."""
        s = self.shape
        return s.batch * s.heads * (2 * s.length - 1) * features * self.itemsize

    def slots(self, features: int) -> int:
        """(B, H, C, W, features) in the compute dtype (the cluster outputs)."""
        s = self.shape
        return s.batch * s.heads * s.clusters * s.window * features * self.itemsize

    def fft(self, length: int, rows: int, itemsize: int | None = None) -> int:
        """The buffers and twiddles of the FFTs of a convolution of ``length`` outputs over ``rows`` rows."""
        itemsize = itemsize or self.itemsize
        plan = fft_plan(length, rows, itemsize)
        return (BUFFERS * plan.half * plan.chunk + plan.size) * itemsize

    def counts(self) -> int:
        """The pair counts of a masked call: counts, inverse, validity (B, 2L - 1), and their float64 FFT."""
        s = self.shape
        return 4 * 8 * s.batch * (2 * s.length - 1) + self.fft(2 * s.length - 1, s.batch, 8)


Bound = Callable[[Sizes], tuple[int, str]]


Floats = Callable[[tuple[int, ...]], Any]
Upload = Callable[[np.ndarray], Any]


def inputs(algorithm: str, shape: Shape, floats: Floats, upload: Upload) -> dict[str, Any]:
    """The arguments the functions of ``algorithm`` ("fsat" or "routing") are planned with at ``shape``:
    float arrays from ``floats(shape)``, index arrays (valid offsets and members) through ``upload``, a
    padding mask (no position padded) on the host."""
    b, h, n, d, dv, c, w = (shape.batch, shape.heads, shape.length, shape.dim, shape.dim_v, shape.clusters,
                            shape.window)
    common = dict(q=floats((b, h, n, d)), k=floats((b, h, n, d)), v=floats((b, h, n, dv)),
                  dout=floats((b, h, n, dv)), mask=np.zeros((b, n), dtype=bool))
    if algorithm == "fsat":
        k_eff = min(shape.top_k, 2 * n - 1)
        offsets = np.broadcast_to(np.arange(k_eff) - k_eff // 2, (b, h, k_eff))
        return dict(common, w=floats((h, d)), c=floats((b, h, 2 * n - 1, d)), s=floats((b, h, 2 * n - 1)),
                    offsets=upload(np.ascontiguousarray(offsets, dtype=np.int64)), bias=floats((b, h, k_eff)),
                    top_k=shape.top_k)
    members = np.broadcast_to(np.arange(c * w).reshape(c, w) % n, (b, h, c, w))
    return dict(common, centroids=floats((h, c, d)), scores=floats((b, h, n, c)),
                members=upload(np.ascontiguousarray(members, dtype=np.int64)), o=floats((b, h, c, w, dv)),
                state=CentroidState(floats((h, c, d)), floats((h, c)), floats((h, c, d))),
                profile=get_profile("tacl"))


def _pairs(p: Planner, x: dict[str, Any]) -> Pairs:
    return pairs(p, x["q"].shape[2], x["mask"])


# Each entry: (run the function's device core on the planner and its inputs, its memory bound).
FUNCTIONS: dict[str, tuple[Callable[[Planner, dict[str, Any]], Any], Bound]] = {
    "fsat.pair_counts": (
        lambda p, x: pair_counts_core(p, x["q"].shape[2], None),
        lambda z: (8 * z.shape.batch * (2 * z.shape.length - 1), "8·(2L-1) B (the counts)")),
    "fsat.pair_counts (masked)": (
        lambda p, x: pair_counts_core(p, x["q"].shape[2], x["mask"]),
        lambda z: (z.counts(), "the counts of B rows and their FFT")),
    "fsat.cross": (
        lambda p, x: cross_core(p, x["q"], x["k"], _pairs(p, x)),
        lambda z: (z.offsets(z.shape.dim) + z.fft(2 * z.shape.length - 1, z.shape.batch * z.shape.heads
                                                   * z.shape.dim) + z.counts(),
                   "c (B, H, 2L-1, Dc) + FFT chunk buffers + counts")),
    "fsat.cross_vjp": (
        lambda p, x: cross_vjp_core(p, x["q"], x["k"], x["c"], _pairs(p, x)),
        lambda z: (2 * z.seq(z.shape.dim) + z.fft(3 * z.shape.length - 2, z.shape.batch * z.shape.heads
                                                  * z.shape.dim) + z.counts(),
                   "da, db (B, H, L, Dc) + FFT chunk buffers + counts")),
    "fsat.estimate": (
        lambda p, x: estimate_core(p, x["c"], x["w"], _pairs(p, x).counts),
        lambda z: (z.offsets(1) + z.counts(), "s (B, H, 2L-1) + counts")),
    "fsat.estimate_vjp": (
        lambda p, x: estimate_vjp_core(p, x["c"], x["w"], x["s"], _pairs(p, x).counts),
        lambda z: (z.offsets(z.shape.dim) + 1024 * z.shape.heads * z.shape.dim * z.itemsize + z.counts(),
                   "dc (B, H, 2L-1, Dc) + dw partial sums (H, <= 1024, Dc) + counts")),
    "fsat.select": (
        lambda p, x: select_core(p, x["s"], x["top_k"]),
        lambda z: (2 * 8 * z.shape.batch * z.shape.heads * z.k_eff + TOPK_BUDGET_BYTES
                   + 16 * (2 * z.shape.length), "offsets and members (B, H, K) + the keys of one chunk")),
    "fsat.sparse_attention": (
        lambda p, x: sparse_attention_core(p, x["q"], x["k"], x["v"], x["offsets"], x["bias"],
                                                            key_padding_mask=x["mask"]),
        lambda z: (z.seq(z.shape.dim_v) + z.seq(1) + 8 * z.shape.batch * z.shape.length,
                   "out (B, H, L, Dv) + lse + validity")),
    "fsat.sparse_attention_vjp": (
        lambda p, x: sparse_attention_vjp_core(p, x["q"], x["k"], x["v"], x["offsets"], x["bias"],
                                                                x["dout"], key_padding_mask=x["mask"]),
        lambda z: (2 * z.seq(z.shape.dim) + 2 * z.seq(z.shape.dim_v) + z.seq(1 + 2 * z.k_eff)
                   + z.shape.batch * (z.shape.heads * z.k_eff + z.shape.length) * z.itemsize,
                   "dq, dk, dv + out, lse + p, dz (B, H, L, K) + dbias + validity")),
    "fsat.attention": (
        lambda p, x: fsat_attention_core(p, x["q"], x["k"], x["v"], x["w"], x["top_k"],
                                                   key_padding_mask=x["mask"]),
        lambda z: (z.offsets(z.shape.dim + 1) + z.fft(2 * z.shape.length - 1, z.shape.batch * z.shape.heads
                                                      * z.shape.dim) + z.counts() + TOPK_BUDGET_BYTES
                   + z.seq(z.shape.dim_v + 1),
                   "c and s (B, H, 2L-1, Dc + 1) + FFT chunk buffers + counts + selection keys + out, lse")),
    "fsat.attention_vjp": (
        lambda p, x: fsat_attention_vjp_core(p, x["q"], x["k"], x["v"], x["w"], x["top_k"],
                                                       x["dout"], key_padding_mask=x["mask"], cross_q=x["q"],
                                                       cross_k=x["k"]),
        lambda z: (2 * z.offsets(z.shape.dim + 1) + z.fft(3 * z.shape.length - 2, z.shape.batch * z.shape.heads
                                                          * z.shape.dim) + z.counts() + TOPK_BUDGET_BYTES
                   + 4 * z.seq(z.shape.dim) + 2 * z.seq(z.shape.dim_v) + z.seq(1 + 2 * z.k_eff),
                   "c, dc, s, ds + FFT chunk buffers + counts + selection keys + the six gradients + out, lse, "
                   "p, dz")),
    "routing.normalize": (
        lambda p, x: normalize_core(p, x["q"], profile=x["profile"]),
        lambda z: (z.seq(z.shape.dim), "x_hat (B, H, L, D)")),
    "routing.normalize_vjp": (
        lambda p, x: normalize_vjp_core(p, x["q"], x["k"], profile=x["profile"]),
        lambda z: (z.seq(z.shape.dim), "dx (B, H, L, D)")),
    "routing.similarity": (
        lambda p, x: similarity_core(p, x["q"], x["centroids"]),
        lambda z: (z.seq(z.shape.clusters), "S (B, H, L, C)")),
    "routing.similarity_vjp": (
        lambda p, x: similarity_vjp_core(p, x["q"], x["centroids"], x["scores"]),
        lambda z: (z.seq(z.shape.dim) + (z.shape.batch + 1) * z.shape.heads * z.shape.clusters * z.shape.dim
                   * z.itemsize, "dx (B, H, L, D) + dμ per batch element (B + 1, H, C, D)")),
    "routing.route": (
        lambda p, x: route_core(p, x["scores"], x["members"].shape[3], padding_flags(
            p, x["mask"], x["q"].shape[0], x["q"].shape[2])),
        lambda z: (z.slots(1) // z.itemsize * 8 + 8 * z.shape.batch * z.shape.length + TOPK_BUDGET_BYTES
                   + 8 * z.shape.length, "members (B, H, C, W) + padding + the keys of one chunk")),
    "routing.cluster_attention": (
        lambda p, x: cluster_attention_core(p, x["q"], x["k"], x["v"], x["members"],
                                                              x["members"], profile=x["profile"]),
        lambda z: (2 * z.seq(z.shape.dim) + z.slots(z.shape.dim_v + 1), "LN(q), LN(k) + o, lse")),
    "routing.cluster_attention_vjp": (
        lambda p, x: cluster_attention_vjp_core(p, x["q"], x["k"], x["v"], x["members"],
                                                                  x["members"], x["o"], profile=x["profile"]),
        lambda z: (6 * z.seq(z.shape.dim) + z.seq(z.shape.dim_v) + z.slots(z.shape.dim_v + 2),
                   "LN(q), LN(k), dfq, dfk, dq, dk, dv + o, lse, delta")),
    "routing.combine": (
        lambda p, x: combine_core(p, x["o"], x["members"], x["q"].shape[2], profile=x["profile"]),
        lambda z: (z.seq(z.shape.dim_v) + 8 * z.shape.batch * z.shape.heads * z.shape.length,
                   "out (B, H, L, Dv) + counts")),
    "routing.combine_vjp": (
        lambda p, x: combine_vjp_core(p, x["members"], x["dout"], profile=x["profile"]),
        lambda z: (z.slots(z.shape.dim_v) + 8 * z.shape.batch * z.shape.heads * z.shape.length,
                   "do (B, H, C, W, Dv) + counts")),
    "routing.local_attention": (
        lambda p, x: local_attention_core(p, x["q"], x["k"], x["v"], x["members"].shape[3],
                                                          key_padding_mask=x["mask"]),
        lambda z: (z.seq(z.shape.dim_v + 1) + 8 * z.shape.batch * z.shape.length, "out, lse + padding")),
    "routing.local_attention_vjp": (
        lambda p, x: local_attention_vjp_core(p, x["q"], x["k"], x["v"], x["members"].shape[3],
                                                              x["dout"], key_padding_mask=x["mask"]),
        lambda z: (2 * z.seq(z.shape.dim) + 2 * z.seq(z.shape.dim_v) + 2 * z.seq(1)
                   + 8 * z.shape.batch * z.shape.length, "dq, dk, dv + out, lse, delta + padding")),
    "routing.assign": (
        lambda p, x: assign_core(p, x["q"], x["centroids"], key_padding_mask=x["mask"]),
        lambda z: (z.seq(1) // z.itemsize * 16, "labels + padding (B, H, L)")),
    "routing.update_centroids": (
        lambda p, x: update_centroids_core(p, x["state"], x["q"], x["k"], profile=x["profile"],
                                                     key_padding_mask=x["mask"]),
        lambda z: (z.seq(1) // z.itemsize * 16 + 8 * z.shape.heads * z.shape.clusters * (z.shape.dim + 1)
                   * z.itemsize, "labels + padding (B, H, L) + eight (H, C, D + 1) states")),
    "routing.commitment_loss": (
        lambda p, x: commitment_loss_core(p, x["q"], x["centroids"], key_padding_mask=x["mask"]),
        lambda z: (z.seq(1) // z.itemsize * 16 + 260 * z.itemsize, "labels + padding (B, H, L) + partial sums")),
    "routing.commitment_loss_vjp": (
        lambda p, x: commitment_loss_vjp_core(p, x["q"], x["centroids"], key_padding_mask=x["mask"]),
        lambda z: (z.seq(z.shape.dim) + z.seq(1) // z.itemsize * 16, "dx (B, H, L, D) + labels + padding")),
    "routing.attention": (
        lambda p, x: routing_attention_core(p, x["q"], x["k"], x["v"], x["centroids"],
                                                      window=x["members"].shape[3], profile=x["profile"],
                                                      key_padding_mask=x["mask"]),
        lambda z: (2 * z.seq(z.shape.dim) + 2 * z.seq(z.shape.clusters) + 2 * z.slots(1) // z.itemsize * 8
                   + TOPK_BUDGET_BYTES + 8 * z.shape.length + z.slots(z.shape.dim_v + 1) + z.seq(z.shape.dim_v)
                   + 16 * z.shape.batch * z.shape.heads * z.shape.length,
                   "q_hat, k_hat + S of q and k + members + the keys of one chunk + o, lse + out + counts")),
    "routing.attention_vjp": (
        lambda p, x: routing_attention_vjp_core(p, x["q"], x["k"], x["v"], x["centroids"], x["dout"],
                                                          window=x["members"].shape[3], profile=x["profile"],
                                                          key_padding_mask=x["mask"]),
        lambda z: (6 * z.seq(z.shape.dim) + z.seq(z.shape.dim_v) + 2 * z.seq(z.shape.clusters)
                   + 2 * z.slots(1) // z.itemsize * 8 + TOPK_BUDGET_BYTES + 8 * z.shape.length
                   + z.slots(z.shape.dim_v + 2) + z.slots(z.shape.dim_v)
                   + 16 * z.shape.batch * z.shape.heads * z.shape.length,
                   "q_hat, k_hat, dfq, dfk, dq, dk, dv + S of q and k + members + keys + o, lse, delta, do + counts")),
}


def plan(name: str, shape: Shape, dtype: str) -> FunctionPlan:
    """The :class:`FunctionPlan` of function ``name`` (a key of :data:`FUNCTIONS`) for one shape and dtype."""
    run, bound = FUNCTIONS[name]
    planner = Planner(dtype)
    arguments = inputs(name.split(".")[0], shape, planner.input, lambda host: planner.input(host.shape, host.dtype))
    result = run(planner, arguments)
    del result  # outputs count until here: the peak holds them
    bound_bytes, words = bound(Sizes(shape, np.dtype(dtype).itemsize))
    return FunctionPlan("numba_cuda", name, shape, dtype, tuple(planner.launches), planner.peak, bound_bytes, words)


def plans(shape: Shape, dtype: str) -> list[FunctionPlan]:
    """Every function's plan for one shape and dtype (``Backend.plans``)."""
    return [plan(name, shape, dtype) for name in FUNCTIONS]

