"""Routing step 6: blocked local attention, run by the Routing Transformer's other heads
(spec/routing.md, step 6).

Positions are cut into blocks of B = ``block`` tokens (the last one may be shorter). A query in
block n sees the keys of blocks n - 1 and n, and of block n + 1 when not causal; when causal, only
keys j <= i. Padded keys are never seen, padded queries output zeros, a query with no visible key
outputs zeros. Logits are q · k / sqrt(D), as both implementations compute them for local heads
(U:783 pre-scales q by D^-1/2; local-attention LA:130).

Only (L/B) blocks of B x 3B logits are formed, never L x L.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from refattn import checks
from refattn.checks import as_float64

__all__ = [
    "local_attention",
    "local_attention_vjp",
    "check_local_attention",
    "check_local_attention_vjp",
    "local_attention_core",
    "local_attention_vjp_core",
]


class _Layout(NamedTuple):
    block: int  # effective block size min(block, L)
    blocks: int  # number of blocks N = ceil(L / block)
    keys: Any  # (N, 3B) key positions seen by each block: blocks n-1, n, n+1 (may be out of range)
    queries: Any  # (N, B) query positions of each block (may be >= L in the last block)


def _layout(length: int, block: int, xp: Any) -> _Layout:
    block = min(block, length)  # a block of L or more tokens is one block holding everything
    blocks = -(-length // block)
    queries = xp.arange(blocks * block).reshape(blocks, block)
    keys = xp.concatenate([queries - block, queries, queries + block], axis=1)
    return _Layout(block, blocks, keys, queries)


def _padded_rows(x: Any, total: int) -> Any:
    """x (B, H, L, F) extended with zero rows to (B, H, total, F)."""
    xp = checks.array_namespace(x)
    extra = total - x.shape[2]
    if extra == 0:
        return x
    return xp.concatenate([x, xp.zeros(x.shape[:2] + (extra, x.shape[3]), dtype=x.dtype)], axis=2)


def _forward(q: Any, k: Any, v: Any, layout: _Layout, causal: bool, mask: Any) -> tuple[Any, ...]:
    xp = checks.array_namespace(q, k, v)
    batch, heads, length, dim = q.shape
    n, width = layout.blocks, layout.block
    total = n * width
    qb = _padded_rows(q, total).reshape(batch, heads, n, width, dim)
    key_index = xp.clip(layout.keys, 0, total - 1)
    kb = _padded_rows(k, total)[:, :, key_index]  # (B, H, N, 3B, D)
    vb = _padded_rows(v, total)[:, :, key_index]
    valid = (layout.keys >= 0) & (layout.keys < length)  # (N, 3B)
    valid = xp.broadcast_to(valid[:, None, :], (n, width, 3 * width))
    valid = valid & (layout.queries < length)[:, :, None]
    if causal:
        valid = valid & (layout.keys[:, None, :] <= layout.queries[:, :, None])
    valid = xp.broadcast_to(valid, (batch, heads, n, width, 3 * width))
    if mask is not None:
        unpadded = xp.concatenate([~mask, xp.zeros((batch, total - length), dtype=bool)], axis=1)
        key_ok = unpadded[:, key_index]  # (B, N, 3B)
        query_ok = unpadded.reshape(batch, n, width)
        valid = valid & (key_ok[:, None, :, None, :] & query_ok[:, None, :, :, None])
    logits = xp.einsum("bhnid,bhnjd->bhnij", qb, kb, optimize=True) / math.sqrt(dim)
    logits[~valid] = -np.inf
    peak = logits.max(axis=-1, keepdims=True)
    peak[~xp.isfinite(peak)] = 0.0
    probs = xp.exp(logits - peak)
    total_w = probs.sum(axis=-1, keepdims=True)
    total_w[total_w == 0] = 1.0
    probs /= total_w
    out = xp.einsum("bhnij,bhnjd->bhnid", probs, vb, optimize=True)
    return qb, kb, vb, key_index, probs, out.reshape(batch, heads, total, -1)[:, :, :length]


def check_local_attention(
    q: Any, k: Any, v: Any, block: Any, causal: Any = False, key_padding_mask: Any = None
) -> tuple[Any, Any, Any, int, bool, Any]:
    """Validate the arguments of :func:`local_attention`; returns them in that order."""
    q, k, v, key_padding_mask = checks.arrays(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    q = checks.sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = checks.sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = checks.sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    block = checks.integer_in_range(block, "block", low=1)
    causal = checks.flag(causal, "causal")
    mask = checks.padding_mask(key_padding_mask, batch, length)
    return q, k, v, block, causal, mask


def local_attention_core(
    q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None
) -> Any:
    """:func:`local_attention` of validated arrays of one floating dtype, computed and returned in it."""
    layout = _layout(q.shape[2], block, checks.array_namespace(q))
    return _forward(q, k, v, layout, causal, key_padding_mask)[-1]


_GRADIENT = "the gradient of the local attention"
OVERFLOWS = {
    "local_attention": (checks.Overflow("the local attention", ("q", "k")),),
    "local_attention_vjp": (checks.Overflow(_GRADIENT, ("dout", "v", "k")),
                            checks.Overflow(_GRADIENT, ("dout", "v", "q")), checks.Overflow(_GRADIENT, ("dout",))),
}


def local_attention(
    q: Any, k: Any, v: Any, block: int, *, causal: bool = False, key_padding_mask: Any = None
) -> np.ndarray:
    """Blocked local attention.

    With n(i) = floor(i / B), query i sees key j iff n(j) ∈ {n(i) - 1, n(i)} (also n(i) + 1 when
    not causal), j <= i when causal, and neither i nor j is padding:

        out_i = sum_j softmax_j(q_i · k_j / sqrt(D)) v_j    over the keys it sees.

    Edge cases: L need not be a multiple of B (the last block is shorter); B >= L makes one block
    (full attention); a padded query, or one whose keys are all padded, outputs 0.

    Args:
        q, k: (B, H, L, D); v: (B, H, L, Dv).
        block: B, an integer >= 1.
        causal: keys j <= i only.
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        out (B, H, L, Dv) float64. Cost O(L · 3B · (D + Dv)) per (batch, head).
    """
    q, k, v, block, causal, key_padding_mask = check_local_attention(q, k, v, block, causal, key_padding_mask)
    q, k, v = as_float64(q, k, v)
    out = local_attention_core(q, k, v, block, causal=causal, key_padding_mask=key_padding_mask)
    checks.check_overflows(out, OVERFLOWS["local_attention"], q=q, k=k)
    return out


def check_local_attention_vjp(
    q: Any, k: Any, v: Any, block: Any, dout: Any, causal: Any = False, key_padding_mask: Any = None
) -> tuple[Any, Any, Any, int, Any, bool, Any]:
    """Validate the arguments of :func:`local_attention_vjp`; returns them in that order."""
    q, k, v, block, causal, key_padding_mask = check_local_attention(q, k, v, block, causal, key_padding_mask)
    dout = checks.float_array(checks.as_array(dout, "dout"), "dout", rank=4, axes="(B, H, L, Dv)")
    checks.expect_shape(dout, "dout", q.shape[:3] + (v.shape[3],), "(B, H, L, Dv)")
    return q, k, v, block, dout, causal, key_padding_mask


def local_attention_vjp_core(
    q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False, key_padding_mask: Any = None
) -> tuple[Any, Any, Any]:
    """:func:`local_attention_vjp` of validated arrays of one floating dtype, computed and returned in it."""
    xp = checks.array_namespace(q, k, v, dout)
    batch, heads, length, dim = q.shape
    layout = _layout(length, block, xp)
    qb, kb, vb, key_index, probs, _ = _forward(q, k, v, layout, causal, key_padding_mask)
    n, width = layout.blocks, layout.block
    total = n * width
    dob = _padded_rows(dout, total).reshape(batch, heads, n, width, -1)
    dp = xp.einsum("bhnid,bhnjd->bhnij", dob, vb, optimize=True)
    dz = probs * (dp - xp.sum(probs * dp, axis=-1, keepdims=True)) / math.sqrt(dim)
    dq = xp.einsum("bhnij,bhnjd->bhnid", dz, kb, optimize=True).reshape(batch, heads, total, dim)[:, :, :length]
    dkb = xp.einsum("bhnij,bhnid->bhnjd", dz, qb, optimize=True)
    dvb = xp.einsum("bhnij,bhnid->bhnjd", probs, dob, optimize=True)
    dk = xp.zeros((batch, heads, total, dim), dtype=q.dtype)
    dv = xp.zeros((batch, heads, total, v.shape[3]), dtype=v.dtype)
    flat = key_index.reshape(-1)  # invalid key slots carry weight 0, so their clipped target is harmless
    for target, values in ((dk, dkb), (dv, dvb)):
        rows = values.reshape(batch, heads, -1, values.shape[-1]).transpose(2, 0, 1, 3)
        xp.add.at(target.transpose(2, 0, 1, 3), flat, rows)
    return dq, dk[:, :, :length], dv[:, :, :length]


def local_attention_vjp(
    q: Any, k: Any, v: Any, block: int, dout: Any, *, causal: bool = False, key_padding_mask: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`local_attention`.

    Per block, with p the weights (0 where not seen) and s = 1/sqrt(D):

        dp_ij = dout_i · v_j,   dz_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'),
        dq_i = s sum_j dz_ij k_j,   dk_j = s sum_i dz_ij q_i,   dv_j = sum_i p_ij dout_i

    the key-side sums running over the (up to three) blocks whose queries see key j.

    Returns:
        (dq, dk, dv) float64, of the shapes of q, k, v.
    """
    q, k, v, block, dout, causal, key_padding_mask = check_local_attention_vjp(
        q, k, v, block, dout, causal, key_padding_mask
    )
    q, k, v, dout = as_float64(q, k, v, dout)
    dq, dk, dv = local_attention_vjp_core(q, k, v, block, dout, causal=causal, key_padding_mask=key_padding_mask)
    checks.check_overflows((dq, dk, dv), OVERFLOWS["local_attention_vjp"], q=q, k=k, v=v, dout=dout)
    return dq, dk, dv
