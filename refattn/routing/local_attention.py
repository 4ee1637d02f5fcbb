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

from typing import Any, NamedTuple

import numpy as np

from refattn._validation import expect_shape, float_array, integer_in_range, padding_mask, sequence


__all__ = ["local_attention", "local_attention_vjp"]


class _Layout(NamedTuple):
    block: int  # effective block size min(block, L)
    blocks: int  # number of blocks N = ceil(L / block)
    keys: np.ndarray  # (N, 3B) key positions seen by each block: blocks n-1, n, n+1 (may be out of range)
    queries: np.ndarray  # (N, B) query positions of each block (may be >= L in the last block)


def _layout(length: int, block: int) -> _Layout:
    block = min(block, length)  # a block of L or more tokens is one block holding everything
    blocks = -(-length // block)
    queries = np.arange(blocks * block).reshape(blocks, block)
    keys = np.concatenate([queries - block, queries, queries + block], axis=1)
    return _Layout(block, blocks, keys, queries)


def _padded_rows(x: np.ndarray, total: int) -> np.ndarray:
    """x (B, H, L, F) extended with zero rows to (B, H, total, F)."""
    extra = total - x.shape[2]
    return x if extra == 0 else np.concatenate([x, np.zeros(x.shape[:2] + (extra, x.shape[3]))], axis=2)


def _forward(q, k, v, layout: _Layout, causal: bool, mask: np.ndarray | None):
    batch, heads, length, dim = q.shape
    n, width = layout.blocks, layout.block
    total = n * width
    qb = _padded_rows(q, total).reshape(batch, heads, n, width, dim)
    key_index = np.clip(layout.keys, 0, total - 1)
    kb = _padded_rows(k, total)[:, :, key_index]  # (B, H, N, 3B, D)
    vb = _padded_rows(v, total)[:, :, key_index]
    valid = (layout.keys >= 0) & (layout.keys < length)  # (N, 3B)
    valid = np.broadcast_to(valid[:, None, :], (n, width, 3 * width))
    valid = valid & (layout.queries < length)[:, :, None]
    if causal:
        valid = valid & (layout.keys[:, None, :] <= layout.queries[:, :, None])
    valid = np.broadcast_to(valid, (batch, heads, n, width, 3 * width))
    if mask is not None:
        unpadded = np.concatenate([~mask, np.zeros((batch, total - length), dtype=bool)], axis=1)
        key_ok = unpadded[:, key_index]  # (B, N, 3B)
        query_ok = unpadded.reshape(batch, n, width)
        valid = valid & (key_ok[:, None, :, None, :] & query_ok[:, None, :, :, None])
    logits = np.einsum("bhnid,bhnjd->bhnij", qb, kb, optimize=True) / np.sqrt(dim)
    logits[~valid] = -np.inf
    peak = logits.max(axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0.0
    probs = np.exp(logits - peak)
    total_w = probs.sum(axis=-1, keepdims=True)
    total_w[total_w == 0] = 1.0
    probs /= total_w
    out = np.einsum("bhnij,bhnjd->bhnid", probs, vb, optimize=True)
    return qb, kb, vb, key_index, probs, out.reshape(batch, heads, total, -1)[:, :, :length]


def _inputs(q, k, v, block, key_padding_mask):
    q = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    k = sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    block = integer_in_range(block, "block", low=1)
    mask = padding_mask(key_padding_mask, batch, length)
    return q, k, v, block, mask


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
    q, k, v, block, mask = _inputs(q, k, v, block, key_padding_mask)
    return _forward(q, k, v, _layout(q.shape[2], block), bool(causal), mask)[-1]


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
    q, k, v, block, mask = _inputs(q, k, v, block, key_padding_mask)
    batch, heads, length, dim = q.shape
    dout = float_array(dout, "dout", rank=4, axes="(B, H, L, Dv)")
    expect_shape(dout, "dout", (batch, heads, length, v.shape[3]), "(B, H, L, Dv)")
    layout = _layout(length, block)
    qb, kb, vb, key_index, probs, _ = _forward(q, k, v, layout, bool(causal), mask)
    n, width = layout.blocks, layout.block
    total = n * width
    dob = _padded_rows(dout, total).reshape(batch, heads, n, width, -1)
    dp = np.einsum("bhnid,bhnjd->bhnij", dob, vb, optimize=True)
    dz = probs * (dp - np.sum(probs * dp, axis=-1, keepdims=True)) / np.sqrt(dim)
    dq = np.einsum("bhnij,bhnjd->bhnid", dz, kb, optimize=True).reshape(batch, heads, total, dim)[:, :, :length]
    dkb = np.einsum("bhnij,bhnid->bhnjd", dz, qb, optimize=True)
    dvb = np.einsum("bhnij,bhnid->bhnjd", probs, dob, optimize=True)
    dk = np.zeros((batch, heads, total, dim))
    dv = np.zeros((batch, heads, total, v.shape[3]))
    flat = key_index.reshape(-1)  # invalid key slots carry weight 0, so their clipped target is harmless
    for target, values in ((dk, dkb), (dv, dvb)):
        np.add.at(target.transpose(2, 0, 1, 3), flat, values.reshape(batch, heads, -1, values.shape[-1]).transpose(2, 0, 1, 3))
    return dq, dk[:, :, :length], dv[:, :, :length]
