"""The CuPy backend's plans (``Backend.plans``, :mod:`refattn.backends.launch`): for given shapes and dtype,
every public function's kernel launches and its device-memory peak beyond its inputs, from the chunk
decisions and work models of :mod:`.memory` and the launch plans of :mod:`.kernels` that the calls
themselves use; nothing is allocated.

The bound a peak must respect is linear in the inputs and outputs, plus one chunk: six times their bytes
(casts, contiguous copies, a step's elementwise temporaries, an FFT's padded buffers; in the compute
dtype, float32 for float16), the (B, H, L, C) similarities and labels where a function holds those of all
heads at once (``update_centroids``, ``commitment_loss``: the reference's core reduces over heads and
batch), and :data:`~.memory.CHUNK_BYTES` or, when one head alone needs more, 32 heads' worth of inputs
and outputs. What grows with W², L·C or an FFT's length exists for one group of heads at a time.
"""

from __future__ import annotations

from refattn.backends.launch import FunctionPlan, Launch, Shape

from . import kernels, memory
from .device import SUPPORTED_DTYPES, compute_dtype

FORWARD = ("fsat_sparse_forward",)
BACKWARD = ("fsat_sparse_backward_query", "fsat_sparse_backward_key")


def _sparse_launches(shape: Shape, names: tuple[str, ...], head_bytes: int = 0) -> tuple[Launch, ...]:
    """The sparse attention kernels' launches, for each distinct group of heads a call launches them on."""
    per_group = min(kernels.heads_per_launch(shape.length), memory.per_chunk(head_bytes))
    columns = {"fsat_sparse_forward": shape.dim_v, "fsat_sparse_backward_query": shape.dim}
    return tuple(kernels.row_launch(name, size, shape.length, columns.get(name, max(shape.dim, shape.dim_v)),
                                    size * shape.length * max(shape.dim, shape.dim_v, shape.top_k) - 1)
                 for size in sorted(memory.group_sizes(shape.batch, shape.heads, per_group)) for name in names)


def plans(shape: Shape, dtype: str) -> tuple[FunctionPlan, ...]:
    """Every public function's plan for ``shape`` in ``dtype`` (none for a dtype the backend lacks)."""
    if dtype not in SUPPORTED_DTYPES:
        return ()
    s, e = {"float64": 8, "float32": 4, "float16": 2}[dtype], compute_dtype(dtype).itemsize
    b, h, n, d, dv, c, w = shape.batch, shape.heads, shape.length, shape.dim, shape.dim_v, shape.clusters, shape.window
    bh, t, k = b * h, 2 * n - 1, min(shape.top_k, 2 * n - 1)
    qkv, slots, rows = bh * n * (2 * d + dv) * s, b * h * c * w, bh * n  # rows: (batch, head, position) triples

    def group(head_bytes: int) -> int:  # the temporaries of the largest group of heads
        return max(memory.group_sizes(b, h, memory.per_chunk(head_bytes))) * head_bytes

    sparse_vjp, counts_row = memory.sparse_vjp_head(n, k, e), memory.pair_counts_row(n)
    block = min(w, n)
    runs, heads_per = memory.local_runs(-(-n // block), memory.per_chunk(memory.local_block(block, d, dv, e)))
    local = heads_per * (runs + 2 if runs * block < n else runs) * memory.local_block(block, d, dv, e)
    fsat_plan = group(memory.fsat_head(n, d, d, e, gradient=False, separate=False))
    fsat_grad = group(memory.fsat_head(n, d, d, e, gradient=True, separate=False))
    # name: (inputs, outputs, temporaries, launches, holds the similarities of all heads)
    table: dict[str, tuple] = {
        "fsat.pair_counts": (b * n, b * t * 8, min(b, memory.per_chunk(counts_row)) * counts_row),
        "fsat.cross": (2 * rows * d * s, bh * t * d * s, group(memory.cross_head(n, d, e))),
        "fsat.cross_vjp": (bh * (2 * n + t) * d * s, 2 * rows * d * s, group(memory.cross_vjp_head(n, d, e))),
        "fsat.estimate": (bh * t * d * s, bh * t * s, bh * t * (d + 3) * e + b * t * 9),
        "fsat.estimate_vjp": (bh * t * (d + 1) * s, bh * t * d * s, bh * t * (3 * d + 3) * e),
        "fsat.select": (bh * t * s, bh * k * 8, group(memory.select_head(t))),
        "fsat.sparse_attention": (qkv + bh * k * (8 + s), rows * (dv + 1) * s, bh * (n + k) * e,
                                  _sparse_launches(shape, FORWARD)),
        "fsat.sparse_attention_vjp": (qkv + rows * dv * s + bh * k * (8 + s), qkv + bh * k * s,
                                      bh * k * e + group(sparse_vjp), _sparse_launches(shape, BACKWARD, sparse_vjp)),
        "fsat.attention": (qkv + h * d * s, rows * dv * s, bh * (k * (8 + e) + n * e) + fsat_plan,
                           _sparse_launches(shape, FORWARD)),
        "fsat.attention_vjp": (qkv + rows * dv * s + h * d * s, qkv + h * d * s,
                               bh * k * (8 + 2 * e) + h * d * e + max(group(sparse_vjp), fsat_grad),
                               _sparse_launches(shape, BACKWARD, sparse_vjp)),
        "routing.normalize": (rows * d * s, rows * d * s, rows * d * 4 * e),
        "routing.normalize_vjp": (2 * rows * d * s, rows * d * s, rows * d * 7 * e),
        "routing.similarity": (rows * d * s + h * c * d * s, rows * c * s, rows * (c + 2 * d) * e),
        "routing.similarity_vjp": (rows * (d + c) * s + h * c * d * s, rows * d * s + h * c * d * s,
                                   rows * 2 * (c + d) * e),
        "routing.route": (rows * c * s, slots * 8, c * n * (4 * s + 24) + c * w * 48),
        "routing.cluster_attention": (qkv + 2 * slots * 8, slots * dv * s,
                                      group(memory.cluster_head(n, d, dv, c, w, e, gradient=False))),
        "routing.cluster_attention_vjp": (qkv + 2 * slots * 8 + slots * dv * s, qkv,
                                          group(memory.cluster_head(n, d, dv, c, w, e, gradient=True))),
        "routing.combine": (slots * (dv * s + 8), rows * dv * s, slots * (2 * dv * e + 17) + rows * (2 * dv + 2) * e
                            + rows * 8),
        "routing.combine_vjp": (slots * 8 + rows * dv * s, slots * dv * s,
                                rows * ((2 * dv + 2) * e + 8) + slots * (dv * e + 17)),
        "routing.local_attention": (qkv, rows * dv * s, local),
        "routing.local_attention_vjp": (qkv + rows * dv * s, qkv, qkv * (e // s - 1) + local),
        "routing.assign": (rows * d * s + h * c * d * s, rows * 8, group(memory.assign_head(n, d, c, e))),
        "routing.update_centroids": (2 * rows * d * s + h * c * (2 * d + 1) * s, h * c * (2 * d + 1) * s,
                                     rows * (3 * d * e + c * e + 40) + 4 * h * c * d * e, (), True),
        "routing.commitment_loss": (rows * d * s + h * c * d * s, 8, rows * (6 * d * e + c * e + 16), (), True),
        "routing.commitment_loss_vjp": (rows * d * s + h * c * d * s, rows * d * s, rows * (6 * d * e + c * e + 16),
                                        (), True),
        "routing.attention": (qkv + h * c * d * s, rows * dv * s,
                              group(memory.routing_head(n, d, dv, c, w, e, gradient=False))),
        "routing.attention_vjp": (qkv + rows * dv * s + h * c * d * s, qkv,
                                  group(memory.routing_head(n, d, dv, c, w, e, gradient=True))),
    }
    widen = e // min(s, e)  # float16 arrays are computed as float32 ones
    result = []
    for name, (inputs, outputs, temporaries, *rest) in table.items():
        launches, similarities = (rest[0] if rest else ()), len(rest) > 1 and rest[1]
        chunk = max(memory.CHUNK_BYTES, 32 * (inputs + outputs) // bh)
        held = rows * (c * e + 16) if similarities else 0
        bound = widen * 6 * (outputs + inputs) + held + chunk
        words = (f"{widen * 6} x (outputs {outputs} B + inputs {inputs} B)" + (
            f" + the (B, H, L, C) similarities and labels {held} B" if held else "") + f" + one chunk {chunk} B")
        result.append(FunctionPlan("cupy", name, shape, dtype, launches, outputs + temporaries, bound, words))
    return tuple(result)
