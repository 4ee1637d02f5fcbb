"""Analytic FLOP and byte models of the benchmarked algorithms (FlashAttention's conventions).

A multiply-add counts 2 FLOP. Backward is 2.5x the forward's matmul FLOPs and forward+backward 3.5x
(``benchmark_flash_attention.py``). Three counts per case:

- ``dense_flops``: the dense-equivalent count, 4·B·H·L²·D for D = Dv (what SDPA or FlashAttention
  would do at this shape); ``dense-eq GFLOP/s`` = dense_flops / time is comparable across algorithms.
- ``flops``: the work actually done: the attended elements only, plus the FFT (FSAT) or the k-means
  assignment (routing). FSAT's attended count is the upper bound K·L per (b, h) (offset τ has
  L − |τ| valid pairs, and K_eff <= K); routing's is C·W² per (b, h).
- ``bytes``: the compulsory traffic: forward reads q, k, v and writes out; backward reads q, k, v,
  out, dout and writes dq, dk, dv.

And one memory model, :func:`fsat_retained_bytes`: what FSAT's forward + backward cannot avoid holding
(output, gradients, saved probabilities), the yardstick of its peak-memory targets.
"""

from __future__ import annotations

import math

DIRECTIONS = ("fwd", "bwd", "fwdbwd")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_MATMUL_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def _check(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")


def next_fast_len(target: int) -> int:
    """The smallest 2**a * 3**b * 5**c >= target (the FFT length FSAT's cross uses)."""
    best = 1 << max(0, (target - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            n = p35
            while n < target:
                n *= 2
            best = min(best, n)
            p35 *= 3
        p5 *= 5
    return best


def dense_flops(batch: int, heads: int, length: int, dim: int, dim_v: int | None = None,
                direction: str = "fwd") -> float:
    """2·B·H·L²·(D + Dv) forward (= 4·B·H·L²·D), times 2.5 backward, 3.5 forward+backward."""
    _check(direction)
    dim_v = dim if dim_v is None else dim_v
    return _MATMUL_FACTOR[direction] * 2.0 * batch * heads * length * length * (dim + dim_v)


def fft_flops(batch: int, heads: int, length: int, dim: int) -> float:
    """FSAT step 1: two real FFTs and one inverse of length n = fast_len(2L − 1) per channel
    (2.5·n·log2 n each) plus the spectral product (6 FLOP per complex bin), over B·H·D channels."""
    n = next_fast_len(2 * length - 1)
    return batch * heads * dim * (3 * 2.5 * n * math.log2(max(n, 2)) + 6 * (n // 2 + 1))


def fsat_flops(batch: int, heads: int, length: int, dim: int, top_k: int, dim_v: int | None = None,
               direction: str = "fwd") -> float:
    """Sparse attention over K diagonals (2·B·H·K·L·(D + Dv)), the FFT cross, the estimate
    (2·B·H·(2L − 1)·D) forward; backward 2.5x the sparse part plus dw (2·B·H·(2L − 1)·D)."""
    _check(direction)
    dim_v = dim if dim_v is None else dim_v
    k_eff = min(top_k, 2 * length - 1)
    sparse = 2.0 * batch * heads * k_eff * length * (dim + dim_v)
    estimate = 2.0 * batch * heads * (2 * length - 1) * dim
    forward = sparse + fft_flops(batch, heads, length, dim) + estimate
    backward = 2.5 * sparse + estimate
    return {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[direction]


def routing_flops(batch: int, heads: int, length: int, dim: int, clusters: int, window: int,
                  dim_v: int | None = None, shared_qk: bool = False, direction: str = "fwd") -> float:
    """k-means assignment (normalize ~3·L·D and similarity 2·L·C·D, for q and k unless shared),
    attention inside the clusters (2·C·W²·(D + Dv)), and the combine (C·W·Dv) per (b, h);
    backward 2.5x the cluster attention plus the combine."""
    _check(direction)
    dim_v = dim if dim_v is None else dim_v
    streams = 1 if shared_qk else 2
    kmeans = batch * heads * streams * (2.0 * length * clusters * dim + 3.0 * length * dim)
    attend = 2.0 * batch * heads * clusters * window * window * (dim + dim_v)
    combine = float(batch * heads * clusters * window * dim_v)
    forward = kmeans + attend + combine
    backward = 2.5 * attend + combine
    return {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[direction]


def attention_bytes(batch: int, heads: int, length: int, dim: int, dim_v: int | None = None,
                    itemsize: int = 4, direction: str = "fwd") -> float:
    """Compulsory bytes: forward q, k, v in and out; backward q, k, v, out, dout in and dq, dk, dv out."""
    _check(direction)
    dim_v = dim if dim_v is None else dim_v
    rows = batch * heads * length * itemsize
    forward = rows * (2 * dim + 2 * dim_v)
    backward = rows * (2 * dim + 2 * dim_v + 2 * dim + dim_v)
    return {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[direction]


def fsat_retained_bytes(batch: int, heads: int, length: int, dim: int, top_k: int, itemsize: int = 4,
                        dim_v: int | None = None, causal: bool = False) -> dict[str, int]:
    """The bytes FSAT's forward + backward cannot avoid holding above its inputs, at one itemsize:

    - ``output``: out (B, H, L, Dv), which autograd keeps for the backward;
    - ``gradients``: dq, dk (B, H, L, D), dv (B, H, L, Dv) and dw (H, D);
    - ``probabilities``: the attention weights (B, H, L, K_eff) saved for the backward, with
      K_eff = min(K, 2L - 1) (causal: min(K, L));
    - ``total``: their sum (B = 1, H = 8, L = 16,384, D = 64, K = 16, float32: 136 MiB).
    """
    dim_v = dim if dim_v is None else dim_v
    k_eff = min(top_k, length if causal else 2 * length - 1)
    rows = batch * heads * length
    parts = {"output": rows * dim_v * itemsize,
             "gradients": (rows * (2 * dim + dim_v) + heads * dim) * itemsize,
             "probabilities": rows * k_eff * itemsize}
    return {**parts, "total": sum(parts.values())}
