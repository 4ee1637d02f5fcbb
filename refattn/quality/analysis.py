"""What a trained model's attention looks like, compared with the task's true offsets.

- :func:`attention_inputs`: the normalised inputs each attention layer receives for a batch;
- :func:`fsat_scores`: FSAT's estimated scores s_tau per head (spec/fsat.md step 2);
- :func:`dense_diagonal_profile`: a dense layer's attention probabilities averaged along each diagonal
  tau = j - i (the quantity s_tau estimates, up to the softmax);
- :func:`offset_hits`: how often each true offset is among FSAT's selected offsets, per head;
- :func:`routing_coverage`: for our routing layer, the fraction of (query i, true offset tau) pairs whose
  key i + tau shares one of the query's clusters, per routing head (chance: about W / L).
"""

from __future__ import annotations

import math

import torch

from refattn import get_backend

from .attentions import DenseAttention
from .model import Transformer

__all__ = ["attention_inputs", "dense_diagonal_profile", "fsat_scores", "offset_hits", "routing_coverage"]

_torch = get_backend("torch")


@torch.no_grad()
def attention_inputs(model: Transformer, tokens: torch.Tensor, padding: torch.Tensor | None) -> list[torch.Tensor]:
    """One (B, L, dim) tensor per block: the input of its attention layer (after the block's LayerNorm)."""
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
             for layer in model.attention_layers]
    try:
        model(tokens, padding)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def fsat_scores(layer: torch.nn.Module, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """(B, H, 2L - 1) scores s of an ``FSATAttention`` layer for input x; index t holds tau = t - (L - 1)."""
    batch, length, _ = x.shape
    if layer.cross is None:
        q, k, _ = layer.qkv(x).chunk(3, dim=-1)
        a, b = (t.view(batch, length, layer.heads, layer.head_dim).transpose(1, 2) for t in (q, k))
    else:
        a, b = (t.view(batch, length, layer.heads, layer.cross_dim).transpose(1, 2)
                for t in layer.cross(x).chunk(2, dim=-1))
    c = _torch.fsat.cross(a, b, key_padding_mask=padding)
    return _torch.fsat.estimate(c, layer.w, key_padding_mask=padding)


@torch.no_grad()
def dense_diagonal_profile(layer: DenseAttention, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """(H, 2L - 1): mean over the batch and over the valid rows i of P[i, i + tau], P the layer's
    attention probabilities; 0 where a diagonal has no valid entry."""
    q, k, _ = layer.split(x)
    batch, heads, length, dim = q.shape
    logits = q @ k.transpose(-1, -2) / math.sqrt(dim)
    keep = torch.ones(length, length, dtype=torch.bool, device=x.device)
    if layer.causal:
        keep = keep.tril()
    keep = keep.expand(batch, 1, length, length)
    if padding is not None:
        keep = keep & ~padding[:, None, None, :] & ~padding[:, None, :, None]
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    totals = torch.zeros(heads, 2 * length - 1, dtype=probs.dtype, device=x.device)
    counts = torch.zeros(2 * length - 1, dtype=probs.dtype, device=x.device)
    for tau in range(-(length - 1), length):
        diagonal = torch.diagonal(probs, offset=tau, dim1=-2, dim2=-1)  # (B, H, L - |tau|)
        valid = torch.diagonal(keep, offset=tau, dim1=-2, dim2=-1)  # (B, 1, L - |tau|)
        totals[:, tau + length - 1] = (diagonal * valid).sum(dim=(0, 2))
        counts[tau + length - 1] = valid.sum()
    return totals / counts.clamp_min(1.0)


def offset_hits(offsets: torch.Tensor, true_offsets: tuple[int, ...]) -> list[list[float]]:
    """[head][t]: the fraction of sequences whose selected offsets (B, H, K) include true_offsets[t]."""
    return [[float((offsets[:, h] == tau).any(dim=-1).float().mean()) for tau in true_offsets]
            for h in range(offsets.shape[1])]


@torch.no_grad()
def routing_coverage(layer: torch.nn.Module, x: torch.Tensor, padding: torch.Tensor | None,
                     true_offsets: tuple[int, ...]) -> list[list[float]]:
    """[routing head][t] for a ``RoutingAttention`` layer: the fraction of queries i (with i + tau in the
    sequence) whose key i + tau is a member of a cluster the query is routed to."""
    batch, length, _ = x.shape
    r = layer.routing_heads
    local_first = layer.profile == "lucidrains"
    heads = slice(layer.local_heads, None) if local_first else slice(0, r)
    q = layer.to_q(x).view(batch, length, layer.heads, layer.dim_head).transpose(1, 2)[:, heads]
    if layer.shared_qk:
        k = q
    else:
        k_all = layer.to_k(x).view(batch, length, -1, layer.dim_head).transpose(1, 2)
        k = k_all[:, layer.local_heads:]
    window = min(layer.window or _torch.routing.default_window(length, layer.num_clusters), length)
    routing = _torch.routing
    q_members = routing.route(routing.similarity(routing.normalize(q, profile=layer.profile), layer.means), window,
                              key_padding_mask=padding)
    k_members = q_members if layer.shared_qk else routing.route(
        routing.similarity(routing.normalize(k, profile=layer.profile), layer.means), window, key_padding_mask=padding)
    # membership as (B, R, C, L) indicators
    in_q, in_k = _indicators(q_members, length), _indicators(k_members, length)
    result = []
    for head in range(r):
        row = []
        for tau in true_offsets:
            queries = torch.arange(max(0, -tau), min(length, length - tau))
            shared = (in_q[:, head][:, :, queries] & in_k[:, head][:, :, queries + tau]).any(dim=1)  # (B, n)
            row.append(float(shared.double().mean()))
        result.append(row)
    return result


def _indicators(members: torch.Tensor, length: int) -> torch.Tensor:
    """(B, R, C, W) member positions (-1 = empty slot) -> (B, R, C, L) bool membership."""
    counts = torch.zeros(*members.shape[:3], length, dtype=torch.int64, device=members.device)
    counts.scatter_add_(3, members.clamp_min(0), (members >= 0).long())
    return counts > 0
