"""Memory-bounded chunking, the one decision the CuPy backend adds to the reference's steps, and the work
models it is made from.

A step whose work is independent per (batch, head) runs the reference's core on groups of heads: as
many whole batch rows as fit in :data:`CHUNK_BYTES` of temporaries, else a run of heads of one batch
row, at least one head. A ``*_head`` function is the temporaries of one (batch, head) in bytes, read
off the reference's core (every array it holds at once, upper bounds; tests/test_cupy_memory.py
measures them); ``itemsize`` is that of the compute dtype. :mod:`.plans` makes the same decisions from
the shapes alone, so what the plans state is what a call does.
"""

from __future__ import annotations

from typing import Any

from refattn.fsat.cross import next_fast_len

CHUNK_BYTES = 1 << 30  # the temporaries of one group: 1 GiB, small next to any current GPU
# refattn.routing.cluster_attention's own chunk of logits (entries); tests/test_cupy_memory.py measures a
# call where it applies, so that a change of the reference's chunk shows.
CLUSTER_LOGITS = 1 << 22


def per_chunk(unit_bytes: int) -> int:
    """How many units (heads, blocks of a head) of ``unit_bytes`` each fit in one chunk (at least one)."""
    return max(1, CHUNK_BYTES // max(1, unit_bytes))


def group_sizes(batch: int, heads: int, per_group: int) -> set[int]:
    """The distinct numbers of heads of the groups :func:`groups` makes (without listing them)."""
    if per_group >= heads:
        rows = min(batch, per_group // heads)
        return {rows * heads} | ({batch % rows * heads} if batch % rows else set())
    return {per_group} | ({heads % per_group} if heads % per_group else set())


def groups(batch: int, heads: int, per_group: int) -> list[tuple[slice, slice]]:
    """(batch rows, heads) index pairs covering (B, H) in groups of at most ``per_group`` heads."""
    if per_group >= heads:
        rows = per_group // heads
        return [(slice(b, min(batch, b + rows)), slice(0, heads)) for b in range(0, batch, rows)]
    return [(slice(b, b + 1), slice(h, min(heads, h + per_group)))
            for b in range(batch) for h in range(0, heads, per_group)]


def part(x: Any, group: tuple[slice, slice], axes: str = "bh") -> Any:
    """``x`` restricted to a group: ``axes`` "bh" for (B, H, ...) arrays, "b" for (B, L) masks, "h" for
    (H, ...) arrays; None stays None."""
    if x is None:
        return None
    if axes == "bh":
        return x[group]
    return x[group[0]] if axes == "b" else x[group[1]]


def local_runs(blocks: int, units: int) -> tuple[int, int]:
    """(query blocks per window, heads per group) of the local attention when ``units`` blocks fit a
    chunk: whole heads when they fit, else runs of blocks with a halo block on either side."""
    if units >= blocks:
        return blocks, units // blocks
    return max(1, units - 2), 1


def pair_counts_row(length: int) -> int:
    """``pair_counts_core`` with a mask, per batch row: the float64 validity, its two padded transforms of
    length N = next_fast_len(2L - 1), the inverse's output, the rounded counts."""
    return 8 * (5 * (next_fast_len(2 * length - 1) + 2) + 2 * (2 * length - 1))


def cross_head(length: int, features: int, itemsize: int) -> int:
    """``cross_core``: a, b cast and zero-padded, and per transform of length N = next_fast_len(2L - 1) the
    padded input, two spectra, cuFFT's work area and the inverse's input copy and output."""
    return features * itemsize * (6 * length + 5 * (next_fast_len(2 * length - 1) + 2))


def cross_vjp_head(length: int, features: int, itemsize: int) -> int:
    """``cross_vjp_core``: a, b, dc cast, padded, g = dc / n; two transforms of length next_fast_len(3L - 2)
    whose full outputs live until the results are copied out."""
    return features * itemsize * (12 * length + 6 * (next_fast_len(3 * length - 2) + 2))


def fsat_head(length: int, dim: int, features: int, itemsize: int, *, gradient: bool, separate: bool) -> int:
    """``plan_core`` (q, k cast, the cross and c, the estimate, the selection's sort keys and indices); with
    ``gradient`` also the recomputed cross, ds, dc and (``separate``) ``cross_vjp_core``."""
    offsets = 2 * length
    plan = 2 * length * dim * itemsize + cross_head(length, features, itemsize) + offsets * (
        features * itemsize + 8 * itemsize + 40)
    grad = cross_head(length, features, itemsize) + offsets * (3 * features + 4) * itemsize + (
        cross_vjp_head(length, features, itemsize) if separate else 0)
    return max(plan, grad) if gradient else plan


def select_head(offsets: int) -> int:
    """``select_core`` on float64 scores: s and noise cast, their sum, the candidates' scores and their
    negation, the stable sort's keys and int64 indices (and its own copies of both)."""
    return offsets * 64


def sparse_vjp_head(length: int, count: int, itemsize: int) -> int:
    """The backward kernels' lse, delta (L) and dz (K, L) of one head, in the compute dtype."""
    return (count + 2) * length * itemsize


def cluster_head(length: int, dim: int, dim_v: int, clusters: int, window: int, itemsize: int, *,
                 gradient: bool) -> int:
    """``cluster_attention_core`` (q, k, v cast, the logit features, every cluster's gathers, logits,
    masks and output at once); with ``gradient`` the feature and value gradients, dp, dz and a scatter."""
    # The reference's core takes clusters in chunks of at most CLUSTER_LOGITS logits (at least one cluster).
    slots, rows = clusters * window, length * itemsize
    pairs = min(clusters, max(1, CLUSTER_LOGITS // window**2)) * window**2
    forward = rows * (2 * dim + dim_v + 4 * dim) + slots * (2 * (dim + dim_v) * itemsize + 32) + pairs * (
        2 * itemsize + 4)
    widest = max(dim, dim_v)
    backward = rows * (2 * dim + dim_v + widest + 7 * dim) + pairs * 3 * itemsize + slots * (3 * widest * itemsize + 9)
    return forward + (backward if gradient else 0)


def routing_head(length: int, dim: int, dim_v: int, clusters: int, window: int, itemsize: int, *,
                 gradient: bool) -> int:
    """``attention_core`` (``attention_vjp_core``) of one head: the routing (normalize, similarities, the
    partition's buffers, members), the cluster attention and the combination."""
    slots, rows = clusters * window, length * itemsize
    routed = rows * (4 * dim + clusters) + clusters * length * (3 * itemsize + 12) + slots * 48
    combined = slots * dim_v * itemsize * 2 + rows * (2 * dim_v + 2) + length * 8
    return routed + cluster_head(length, dim, dim_v, clusters, window, itemsize, gradient=gradient) + combined


def local_block(block: int, dim: int, dim_v: int, itemsize: int) -> int:
    """``local_attention_vjp_core`` per block of W rows (the forward holds less): W rows cast and padded,
    3W key and value rows gathered, the (W, 3W) logits, weights, masks, dp and dz, the row gradients."""
    return block * itemsize * 8 * (dim + dim_v) + 3 * block * block * (6 * itemsize + 3)


def assign_head(length: int, dim: int, clusters: int, itemsize: int) -> int:
    """``assign_core``: x_hat cast, the (L, C) similarities and the matmul's operand copy, the int64 labels."""
    return length * (2 * dim * itemsize + clusters * itemsize + 16)
