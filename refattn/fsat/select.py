"""FSAT step 2b: choose the dominant diagonals of the estimated matrix (spec/fsat.md, step 2).

The estimated attention matrix is Toeplitz, A_ij proportional to exp(s_{j-i}); its dominant
elements are its top diagonals. The offset set always holds tau = 0, plus the K - 1 best candidates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array, integer_in_range, score_array

from ._checks import length_from_offsets

__all__ = ["select", "candidate_order"]


def candidate_order(length: int, *, causal: bool = False) -> np.ndarray:
    """The candidate offsets in tie-break priority: -1, 1, -2, 2, ..., -(L-1), L-1 (causal: -1, ..., -(L-1)).

    Smaller |tau| first, then the negative offset: a stable sort of the scores in this order breaks
    every tie by the rule of spec/interface.md. tau = 0 is not a candidate (it is always selected).
    """
    magnitude = np.arange(1, length, dtype=np.int64)
    if causal:
        return -magnitude
    return np.stack([-magnitude, magnitude], axis=1).reshape(-1)


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> np.ndarray:
    """Pick K_eff offsets: tau = 0 and the K - 1 candidates with the largest s_tau + g_tau.

    Candidates are all tau != 0 (causal: tau < 0). Ties go to the smaller |tau|, then to the negative
    offset. K_eff = min(K, number of candidates + 1), i.e. min(K, 2L - 1), causal min(K, L); an
    offset with score -inf (n_tau = 0) is still a candidate and is taken, last, when K asks for it.

    Args:
        s: scores (B, H, 2L - 1), index t holds tau = t - (L - 1); finite or -inf.
        top_k: K >= 1, an integer.
        causal: restrict the candidates to tau < 0.
        noise: optional finite (B, H, 2L - 1) array g added to s for the selection only (e.g.
            Gumbel noise for Gumbel-top-k exploration); it never enters the attention logits.
            Nothing random is drawn here.

    Returns:
        offsets (B, H, K_eff) int64, ascending, distinct, always containing 0.

    Cost O(L log L) per (batch, head) (a stable sort of the candidates).
    """
    s = score_array(s, "s", rank=3, axes="(B, H, 2L - 1)")
    length = length_from_offsets(s.shape[2], "s")
    top_k = integer_in_range(top_k, "top_k", low=1)
    if noise is not None:
        noise = float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        expect_shape(noise, "noise", s.shape, "(B, H, 2L - 1)")
        s = s + noise
    candidates = candidate_order(length, causal=bool(causal))
    k_eff = min(top_k, candidates.size + 1)
    scores = s[:, :, candidates + (length - 1)]
    # Stable sort, descending score: equal scores keep the tie-break order of `candidates`.
    # (-(-inf) = +inf sorts last; all -inf candidates then stay in tie-break order.)
    best = np.argsort(-scores, axis=-1, kind="stable")[:, :, : k_eff - 1]
    chosen = candidates[best]
    zero = np.zeros(s.shape[:2] + (1,), dtype=np.int64)
    return np.sort(np.concatenate([zero, chosen], axis=-1), axis=-1).astype(np.int64, copy=False)
