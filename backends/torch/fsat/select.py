"""FSAT step 2b on tensors (reference: :mod:`refattn.fsat.select`).

Differs from the reference: the best candidates are those of ``torch.sort(..., descending=True,
stable=True)`` (equal scores keep the tie-break order, -inf sorts last), found without sorting all of
them (:func:`best_positions`), on the scores' device; the offsets are compared in the scores' compute
dtype (float32 for half-precision scores).
"""

from __future__ import annotations

from typing import Any

import torch

from refattn import checks

from ..tensors import checked, compute_dtype, tensors

__all__ = ["select", "check_select", "select_core", "candidate_order", "best_positions"]


def candidate_order(length: int, *, causal: bool = False, device: Any = None) -> torch.Tensor:
    """:func:`refattn.fsat.select.candidate_order` as an int64 tensor on ``device``."""
    length = checks.integer_in_range(length, "length", low=1)
    causal = checks.flag(causal, "causal")
    magnitude = torch.arange(1, length, dtype=torch.int64, device=device)
    if causal:
        return -magnitude
    return torch.stack([-magnitude, magnitude], dim=1).reshape(-1)


def select_core(s: torch.Tensor, top_k: int, causal: bool) -> torch.Tensor:
    """Offsets (B, H, K_eff) int64 ascending from the (noisy) scores s (B, H, 2L - 1); no checks."""
    length = (s.shape[2] + 1) // 2
    candidates = candidate_order(length, causal=causal, device=s.device)
    k_eff = min(top_k, candidates.numel() + 1)
    zero = torch.zeros(s.shape[:2] + (1,), dtype=torch.int64, device=s.device)
    if k_eff == 1:
        return zero
    ranked = s.index_select(2, candidates + (length - 1))
    return torch.sort(torch.cat([zero, candidates[best_positions(ranked, k_eff - 1)]], dim=-1), dim=-1).values


def best_positions(ranked: torch.Tensor, count: int) -> torch.Tensor:
    """(B, H, count) the positions of the ``count`` largest entries of ranked (B, H, C), ties to the earlier
    position (-inf last): the first ``count`` of a stable descending sort, as a set in ascending order.

    By the count-th largest value (``torch.topk``, O(C)) instead of sorting all C: the entries above it,
    then the earliest of those equal to it."""
    threshold = torch.topk(ranked, count, dim=-1).values[..., -1:]
    above = ranked > threshold
    ties = ranked == threshold
    room = count - above.sum(dim=-1, keepdim=True)
    chosen = above | (ties & (ties.cumsum(dim=-1) <= room))
    return chosen.nonzero()[:, 2].view(ranked.shape[0], ranked.shape[1], count)


@checked
def check_select(s: Any, top_k: Any, causal: Any = False, noise: Any = None) -> tuple[torch.Tensor, int, bool, Any]:
    """Validate the arguments of :func:`select`; returns them in that order."""
    s, noise = tensors(s=s, noise=noise)
    checks.float_array(s, "s", rank=3, axes="(B, H, 2L - 1)", allow_neg_inf=True)
    checks.length_from_offsets(s.shape[2], "s")
    top_k = checks.integer_in_range(top_k, "top_k", low=1)
    causal = checks.flag(causal, "causal")
    if noise is not None:
        checks.float_array(noise, "noise", rank=3, axes="(B, H, 2L - 1)")
        checks.expect_shape(noise, "noise", tuple(s.shape), "(B, H, 2L - 1)")
    return s, top_k, causal, noise


def select(s: Any, top_k: int, *, causal: bool = False, noise: Any = None) -> torch.Tensor:
    """The offsets (B, H, K_eff) int64, ascending, on s's device; no gradient."""
    s, top_k, causal, noise = check_select(s, top_k, causal, noise)
    cd = compute_dtype(s.dtype)
    s = s.detach().to(cd)
    if noise is not None:
        s = s + noise.detach().to(cd)
    return select_core(s, top_k, causal)
