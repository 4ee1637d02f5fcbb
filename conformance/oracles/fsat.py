"""Naive FSAT oracles: the definitions of spec/fsat.md written out literally, for tests only.

These functions are test oracles, quadratic in L on purpose: every pair (i, j) is visited, the
selection is a plain sort with the tie-break rule spelled out as a Python key, and the attention is
a dense masked L x L softmax. They share no code with ``refattn.fsat`` (they import nothing from it)
so that agreement between the two is evidence, not tautology. Use them at small L only.

Conventions are those of spec/interface.md: arrays (B, H, L, .), key_padding_mask bool (B, L) with
True = padding, offset axis of length 2L - 1 where index t holds tau = t - (L - 1).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "pair_counts",
    "cross",
    "estimate",
    "select",
    "sparse_attention",
    "attention",
]


def _unpadded(mask, batch: int, length: int) -> np.ndarray:
    """(B, L) bool, True where the position is real (not padding)."""
    if mask is None:
        return np.ones((batch, length), dtype=bool)
    return ~np.asarray(mask, dtype=bool)


def pair_counts(length: int, key_padding_mask=None, batch: int = 1) -> np.ndarray:
    """n[b, t] = number of pairs (i, j), both unpadded, with j - i = t - (L - 1); a double loop."""
    real = _unpadded(key_padding_mask, batch if key_padding_mask is None else len(key_padding_mask), length)
    counts = np.zeros((real.shape[0], 2 * length - 1), dtype=np.int64)
    for bb in range(real.shape[0]):
        for i in range(length):
            for j in range(length):
                if real[bb, i] and real[bb, j]:
                    counts[bb, j - i + length - 1] += 1
    return counts


def cross(a, b, key_padding_mask=None) -> np.ndarray:
    """c[., t] = mean over the valid pairs (i, j = i + tau) of a_i * b_j; 0 where there is none.

    Every pair (i, j) of every (batch, head) is formed explicitly (an (L, L, Dc) product) and added
    to its diagonal j - i one by one (np.add.at).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    batch, heads, length, features = a.shape
    real = _unpadded(key_padding_mask, batch, length)
    counts = pair_counts(length, key_padding_mask, batch)
    counts = np.broadcast_to(counts, (batch, 2 * length - 1))
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    diagonal = (j - i + length - 1).ravel()
    c = np.zeros((batch, heads, 2 * length - 1, features))
    for bb in range(batch):
        pair_ok = (real[bb][:, None] & real[bb][None, :]).ravel()
        for hh in range(heads):
            products = (a[bb, hh][:, None, :] * b[bb, hh][None, :, :]).reshape(-1, features)
            sums = np.zeros((2 * length - 1, features))
            np.add.at(sums, diagonal[pair_ok], products[pair_ok])
            for t in range(2 * length - 1):
                if counts[bb, t] > 0:
                    c[bb, hh, t] = sums[t] / counts[bb, t]
    return c


def estimate(c, w, key_padding_mask=None) -> np.ndarray:
    """s[b, h, t] = sum_d w[h, d] c[b, h, t, d] / sqrt(Dc), -inf where no valid pair has offset tau."""
    c = np.asarray(c, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    batch, heads, count, features = c.shape
    length = (count + 1) // 2
    counts = np.broadcast_to(pair_counts(length, key_padding_mask, batch), (batch, count))
    s = np.empty((batch, heads, count))
    for bb in range(batch):
        for hh in range(heads):
            for t in range(count):
                if counts[bb, t] == 0:
                    s[bb, hh, t] = -math.inf
                else:
                    s[bb, hh, t] = sum(w[hh, d] * c[bb, hh, t, d] for d in range(features)) / math.sqrt(features)
    return s


def select(s, top_k: int, causal: bool = False, noise=None) -> np.ndarray:
    """tau = 0, plus the top_k - 1 candidates sorted by the key (-(s + g), |tau|, tau > 0); ascending."""
    s = np.asarray(s, dtype=np.float64)
    if noise is not None:
        s = s + np.asarray(noise, dtype=np.float64)
    batch, heads, count = s.shape
    length = (count + 1) // 2
    candidates = [tau for tau in range(-(length - 1), length) if tau != 0 and (tau < 0 or not causal)]
    k_eff = min(top_k, len(candidates) + 1)
    out = np.empty((batch, heads, k_eff), dtype=np.int64)
    for bb in range(batch):
        for hh in range(heads):
            def key(tau: int, row: np.ndarray = s[bb, hh]) -> tuple[float, int, int]:
                return (-float(row[tau + length - 1]), abs(tau), 0 if tau < 0 else 1)

            ranked = sorted(candidates, key=key)
            out[bb, hh] = sorted([0] + ranked[: k_eff - 1])
    return out


def sparse_attention(q, k, v, offsets, bias=None, causal=False, key_padding_mask=None):
    """Dense masked attention: logits q_i . k_j / sqrt(D) + bias(j - i) on an L x L grid, allowed
    only where j - i is a selected offset, j <= i if causal, i and j unpadded; row softmax over the
    allowed entries; a row with none allowed (or all at -inf) gives zeros and lse -inf, one with a logit of
    +inf or NaN (q_i . k_j overflowed) NaN.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    offsets = np.asarray(offsets)
    batch, heads, length, dim = q.shape
    real = _unpadded(key_padding_mask, batch, length)
    out = np.zeros((batch, heads, length, v.shape[3]))
    lse = np.full((batch, heads, length), -math.inf)
    tau = np.arange(length)[None, :] - np.arange(length)[:, None]  # tau[i, j] = j - i
    for bb in range(batch):
        for hh in range(heads):
            logits = q[bb, hh] @ k[bb, hh].T / math.sqrt(dim)
            allowed = np.zeros((length, length), dtype=bool)
            bias_grid = np.zeros((length, length))
            for m, offset in enumerate(offsets[bb, hh]):
                on_diagonal = tau == offset
                allowed |= on_diagonal
                if bias is not None:
                    bias_grid[on_diagonal] = bias[bb, hh, m]
            if causal:
                allowed &= tau <= 0
            allowed &= real[bb][:, None] & real[bb][None, :]
            allowed &= bias_grid != -math.inf  # a bias of -inf removes its offset
            logits = np.where(allowed, logits + np.where(allowed, bias_grid, 0.0), -math.inf)
            for i in range(length):
                row = logits[i]
                if np.all(row == -math.inf):
                    continue
                top = row.max()
                weights = np.exp(row - top)
                out[bb, hh, i] = weights @ v[bb, hh] / weights.sum()
                lse[bb, hh, i] = top + math.log(weights.sum())
    return out, lse


def attention(q, k, v, w, top_k, causal=False, key_padding_mask=None, noise=None, cross_q=None, cross_k=None):
    """The whole FSAT forward from the oracles above: cross -> estimate -> select -> dense attention."""
    a = q if cross_q is None else cross_q
    b = k if cross_k is None else cross_k
    length = np.shape(q)[2]
    s = estimate(cross(a, b, key_padding_mask), w, key_padding_mask)
    offsets = select(s, top_k, causal, noise)
    bias = np.take_along_axis(s, offsets + length - 1, axis=2)
    out, _ = sparse_attention(q, k, v, offsets, bias, causal, key_padding_mask)
    return out
