"""The swappable attentions of the benchmark's Transformer, all ``(B, L, dim) -> (B, L, dim)`` layers.

Every layer has q/k/v and output projections of the model width (with biases) and takes
``forward(x, padding)`` (padding: bool (B, L), True = padding, or None). A layer with an auxiliary
loss (the routing layers' k-means commitment loss) leaves it in ``aux_loss`` after each forward; the
model adds it to the task loss.

- ``dense``: ``scaled_dot_product_attention`` over all keys (causal or not).
- ``fsat``: :class:`refattn.backends.torch.FSATAttention` (K offsets per head).
- ``routing``: :class:`refattn.backends.torch.RoutingAttention` (profile ``tacl``), half of the
  heads local.
- ``lucidrains``: the same layout, the routing heads computed by the peer,
  ``routing_transformer.KmeansAttention`` (its own k-means: data-dependent initialisation, centroid
  moving averages, a learned memory key/value when causal with unshared QK); the local heads as ours.
- ``local``: blocked local attention only (each query sees its block and the previous one, and the
  next one when not causal), every head.
"""

from __future__ import annotations

import torch
from torch import nn

from refattn import get_backend
from refattn.backends.torch import FSATAttention, RoutingAttention

from .config import ATTENTIONS, AttentionConfig

__all__ = ["DenseAttention", "LocalAttention", "PeerRoutingAttention",
           "make_attention"]

_torch = get_backend("torch")


class _Projected(nn.Module):
    """q, k, v and output projections of width ``dim`` split into ``heads`` heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim, heads: expected dim divisible by heads, got dim={dim}, heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.aux_loss: torch.Tensor | None = None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, length, self.dim))


class DenseAttention(_Projected):
    """Full softmax attention (``scaled_dot_product_attention``); padded keys are masked."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__(dim, heads)
        self.causal = causal

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        sdpa = nn.functional.scaled_dot_product_attention
        if padding is None:
            return self.merge(sdpa(q, k, v, is_causal=self.causal))
        keep = ~padding[:, None, None, :]  # (B, 1, 1, L): every row keeps its unpadded keys
        if self.causal:
            length = x.shape[1]
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        return self.merge(sdpa(q, k, v, attn_mask=keep))


class LocalAttention(_Projected):
    """Blocked local attention in every head (``routing.local_attention`` of the torch backend)."""

    def __init__(self, dim: int, heads: int, causal: bool, block: int) -> None:
        super().__init__(dim, heads)
        self.causal, self.block = causal, block

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        block = min(self.block, x.shape[1])
        return self.merge(_torch.routing.local_attention(q, k, v, block, causal=self.causal, key_padding_mask=padding))


class _FSAT(FSATAttention):
    """``FSATAttention`` with the benchmark's ``forward(x, padding)`` signature."""

    aux_loss = None

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, key_padding_mask=padding)


class _Routing(RoutingAttention):
    """``RoutingAttention`` whose commitment loss is the ``aux_loss``."""

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, key_padding_mask=padding)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.commitment_loss


def _kmeans_attention() -> type:
    try:
        from routing_transformer import KmeansAttention
    except ImportError as error:
        raise ImportError("attention 'lucidrains' needs the peer package routing-transformer 1.6.1: "
                          f"pip install 'refattn[peer]' ({error})") from error
    return KmeansAttention


class PeerRoutingAttention(_Projected):
    """lucidrains' ``KmeansAttention`` in the routing heads, our blocked local attention in the others.

    The peer's k-means initialises its centroids from the first training batch with ``torch.randperm``
    on the global RNG; that call runs inside ``torch.random.fork_rng`` seeded from ``generator``, so the
    global RNG is neither used nor changed. Its centroid moving average is applied after every training
    forward (lucidrains applies the batch means from a backward hook; with one forward per step this is
    the same update).
    """

    def __init__(self, dim: int, heads: int, causal: bool, shared_qk: bool, clusters: int, window: int,
                 local_heads: int, local_block: int, generator: torch.Generator) -> None:
        super().__init__(dim, heads)
        if not 0 <= local_heads < heads:
            raise ValueError(f"local_heads: expected an integer in [0, heads - 1] = [0, {heads - 1}], "
                             f"got {local_heads}")
        kmeans_attention = _kmeans_attention()
        self.causal, self.shared_qk = causal, shared_qk
        self.local_heads, self.local_block = local_heads, local_block
        self.routing = kmeans_attention(clusters, window, heads - local_heads, self.head_dim, causal=causal,
                                        shared_qk=shared_qk, dropout=0.0)
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(x)
        local = self.local_heads
        keep = None if padding is None else ~padding
        if bool(self.routing.kmeans.initted):
            routed, self.aux_loss = self.routing(q[:, local:], k[:, local:], v[:, local:], query_mask=keep)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                routed, self.aux_loss = self.routing(q[:, local:], k[:, local:], v[:, local:], query_mask=keep)
        if self.training:
            self.routing.kmeans.update()
        if not local:
            return self.merge(routed)
        block = min(self.local_block, x.shape[1])
        nearby = _torch.routing.local_attention(q[:, :local], k[:, :local], v[:, :local], block, causal=self.causal,
                                                key_padding_mask=padding)
        return self.merge(torch.cat([nearby, routed], dim=1))


def make_attention(name: str, dim: int, heads: int, length: int, causal: bool, config: AttentionConfig,
                   generator: torch.Generator) -> nn.Module:
    """The attention ``name`` of :data:`ATTENTIONS` for sequences of ``length`` tokens.

    ``generator`` seeds everything random inside the layer (FSAT's Gumbel noise, the routing
    centroids); parameters are initialised from the global torch RNG, which the caller scopes.
    """
    if name == "dense":
        return DenseAttention(dim, heads, causal)
    if name == "local":
        return LocalAttention(dim, heads, causal, config.local_block)
    if name == "fsat":
        noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return _FSAT(dim, heads, config.top_k, causal=causal, generator=noise, **dict(config.fsat_options))
    clusters = config.clusters or _torch.routing.default_num_clusters(length)
    window = config.window or _torch.routing.default_window(length, clusters)
    shared_qk = causal  # lucidrains' default, and the TACL code's for decoders
    local_heads = heads // 2 if config.local_heads is None else config.local_heads
    if name == "routing":
        return _Routing(dim, heads, num_clusters=clusters, window=window, causal=causal, shared_qk=shared_qk,
                        local_heads=local_heads, local_block=config.local_block, bias=True,
                        generator=generator)
    if name == "lucidrains":
        return PeerRoutingAttention(dim, heads, causal, shared_qk, clusters, window, local_heads,
                                    config.local_block, generator)
    raise ValueError(f"attention: expected one of {', '.join(ATTENTIONS)}, got {name!r}")
