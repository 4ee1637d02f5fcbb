"""The benchmark's settings: the attention names and the model, attention and training configurations.

Plain dataclasses without torch, so that the command line can be built without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ATTENTIONS", "AttentionConfig", "ModelConfig", "TrainConfig"]

ATTENTIONS = ("dense", "fsat", "routing", "lucidrains", "local")
"""The ``--attention`` choices (see :mod:`refattn.quality.attentions`)."""


@dataclass(frozen=True)
class ModelConfig:
    """Width, heads, Transformer blocks and the MLP's expansion factor; the same for every attention."""

    dim: int = 64
    heads: int = 4
    depth: int = 2
    mlp_ratio: int = 4


@dataclass(frozen=True)
class AttentionConfig:
    """Hyperparameters of the sparse attentions (the same for every task).

    top_k: FSAT's K (offsets per head, tau = 0 among them); fsat_options: further FSATAttention
    keyword arguments as (name, value) pairs (the exploration schedule). clusters, window: routing C
    and W (None: C = round(sqrt(L)), W = ceil(L / C)). local_heads: routing heads that are local
    instead (None: half of the heads); local_block: the block of the local heads and of the local baseline.
    """

    top_k: int = 16
    fsat_options: tuple[tuple[str, Any], ...] = ()
    clusters: int | None = None
    window: int | None = None
    local_heads: int | None = None
    local_block: int = 64


@dataclass(frozen=True)
class TrainConfig:
    """steps: the step budget; seconds: the training-time budget (None: steps only), whichever ends
    first; batch: sequences per step; lr: AdamW's learning rate after a linear warm-up of ``warmup``
    steps (None: a tenth of the step budget, so that a short budget is not all warm-up; then constant,
    so every point of a curve is a fair stopping point); eval_every: steps
    between evaluations; eval_size: held-out sequences; threads: torch's intra-op threads."""

    steps: int = 1000
    seconds: float | None = None
    batch: int = 8
    lr: float = 3e-3
    warmup: int | None = None
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_every: int = 50
    eval_size: int = 64
    seed: int = 0
    threads: int = 1

    @property
    def warmup_steps(self) -> int:
        """The warm-up's length in steps: ``warmup``, or a tenth of the step budget (at least 1)."""
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)
