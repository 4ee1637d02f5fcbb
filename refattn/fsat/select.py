"""FSAT step 2b: choose the dominant diagonals of the estimated matrix (spec/fsat.md, step 2).

The estimated attention matrix is Toeplitz, A_ij proportional to exp(s_{j-i}); its dominant
elements are its top diagonals. The offset set always holds tau = 0, plus the K - 1 best candidates.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from refattn import checks

__all__ = ["select", "check_select", "select_core", "candidate_order"]


def candidate_order(length: int, *, causal: bool = False, xp: ModuleType = np) -> Any:
    """The candidate offsets in tie-break priority: -1, 1, -2, 2, ..., -(L-1), L-1 (causal: -1, ..., -(L-1)).

    Smaller |tau| first, then the negative offset: a stable sort of the scores in this order breaks
    every tie by the rule of spec/interface.md. tau = 0 is not a candidate (it is always selected).
    An int64 array of the namespace ``xp`` (NumPy by default).
    """
    magnitude = xp.arange(1, length, dtype=np.int64)
    if causal:
        return -magnitude
    return xp.stack([-magnitude, magnitude], axis=1).reshape(-1)


def check_select(s: Any, top_k: Any, causal: Any = False, noise: Any = None) -> tuple[Any, int, bool, Any]:
    """Validate the arguments of :func:`select`; returns them in that order."""
    s, noise = checks.arrays(s=s, noise=noise)
    s = checks.float_array(s, "s", rank=3, axes="(B, H, 2L - 1)", allow_neg_inf=True)
    checks.length_from_offsets(s.shape[2], "s")
    top_k = checks.integer_in_range(top_k, "top_k", low=1)
    causal = checks.flag(causal, "causal")
    if noise is not None:
        noise = checks.float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        checks.expect_shape(noise, "noise", s.shape, "(B, H, 2L - 1)")
    return s, top_k, causal, noise


def select_core(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> Any:
    """:func:`select` of validated arguments; the scores are compared in their own dtype (the
    reference's float64: a backend that wants the reference's choices passes float64 scores)."""
    xp = checks.array_namespace(s, noise)
    length = (s.shape[2] + 1) // 2
    if noise is not None:
        s = s + noise
    candidates = candidate_order(length, causal=causal, xp=xp)
    k_eff = min(top_k, candidates.size + 1)
    scores = s[:, :, candidates + (length - 1)]
    # Stable sort, descending score: equal scores keep the tie-break order of `candidates`.
    # (-(-inf) = +inf sorts last; all -inf candidates then stay in tie-break order.)
    best = xp.argsort(-scores, axis=-1, kind="stable")[:, :, : k_eff - 1]
    chosen = candidates[best]
    zero = xp.zeros(s.shape[:2] + (1,), dtype=np.int64)
    return xp.sort(xp.concatenate([zero, chosen], axis=-1), axis=-1).astype(np.int64, copy=False)


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
    s, top_k, causal, noise = check_select(s, top_k, causal, noise)
    return select_core(checks.as_float64(s), top_k, causal=causal, noise=checks.as_float64(noise))
