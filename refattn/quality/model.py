"""The benchmark's Transformer: one architecture, the attention swappable.

    tokens (B, L) -> embedding + sinusoidal positions -> depth x pre-norm block -> LayerNorm -> head
    block: x = x + attention(LN(x), padding);  x = x + MLP(LN(x))   (MLP: Linear, GELU, Linear)

The head is per position (``num_targets`` x ``num_classes`` logits) or, for sequence
classification, applied to the mean of the unpadded positions. The positions are a fixed sinusoidal
table added to the embedding (no parameters): every attention sees the same inputs, and FSAT's cross
of q and k carries the position information its estimator needs to tell offsets apart.

Everything but the attention layers (embedding, norms, MLPs, head) is identical for every attention:
:func:`parameter_counts` splits the count into the two parts, and the trainer checks that the
non-attention part does not depend on the attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attentions import make_attention
from .config import AttentionConfig, ModelConfig
from .tasks import Task

__all__ = ["Transformer", "parameter_counts", "sinusoidal_positions"]


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(L, dim): sin(i w_f) in the even features, cos(i w_f) in the odd ones, w_f = 10000^(-2f/dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


class Block(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, attention: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), padding)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """The model for ``task`` with attention ``attention`` (one of ``attentions.ATTENTIONS``).

    Parameters are initialised from ``seed`` inside ``torch.random.fork_rng`` (the global RNG's state
    is restored afterwards); the attention layers' own randomness comes from a generator seeded from
    ``seed`` too. ``forward(tokens, padding)`` returns (logits, aux_loss): logits (B, L, T, C) per
    position or (B, C) per sequence; aux_loss the sum of the layers' auxiliary losses (0-d).
    """

    def __init__(self, task: Task, attention: str, config: ModelConfig | None = None,
                 attention_config: AttentionConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        config = config or ModelConfig()
        attention_config = attention_config or AttentionConfig()
        self.config, self.attention_name = config, attention
        self.per_position = task.num_targets > 0
        self.num_targets, self.num_classes = max(1, task.num_targets), task.num_classes
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(task.vocab_size, config.dim)
            self.blocks = nn.ModuleList(
                Block(config.dim, config.mlp_ratio,
                      make_attention(attention, config.dim, config.heads, task.length, task.causal, attention_config,
                                     generator))
                for _ in range(config.depth))
            self.norm = nn.LayerNorm(config.dim)
            self.head = nn.Linear(config.dim, self.num_targets * self.num_classes)
        self.register_buffer("positions", sinusoidal_positions(task.length, config.dim), persistent=False)

    @property
    def attention_layers(self) -> list[nn.Module]:
        return [block.attention for block in self.blocks]

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.positions[:length]
        for block in self.blocks:
            x = block(x, padding)
        x = self.norm(x)
        aux = sum((layer.aux_loss for layer in self.attention_layers if layer.aux_loss is not None),
                  torch.zeros((), device=x.device))
        if self.per_position:
            return self.head(x).view(*tokens.shape, self.num_targets, self.num_classes), aux
        if padding is None:
            pooled = x.mean(dim=1)
        else:
            keep = (~padding).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return self.head(pooled), aux


def parameter_counts(model: Transformer) -> dict[str, int]:
    """{'attention': parameters of the attention layers, 'rest': every other parameter, 'total'}."""
    attention = sum(p.numel() for layer in model.attention_layers for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"attention": attention, "rest": total - attention, "total": total}
