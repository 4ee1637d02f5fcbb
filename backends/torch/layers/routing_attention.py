"""``RoutingAttention``: the Routing Transformer's attention layer (spec/routing.md) as a ``torch.nn.Module``.

    layer = RoutingAttention(dim=512, heads=8, local_heads=4, num_clusters=16, causal=True, shared_qk=True)
    y = layer(x)                                    # x (B, L, dim) -> y (B, L, dim)
    loss = task_loss + layer.commitment_loss        # the k-means commitment loss of the last forward
    # in training mode the centroids were updated at the end of that forward

Heads. Of the ``heads`` heads, ``local_heads`` run blocked local attention
(``routing.local_attention`` with ``local_block``) and the others run routing attention
(``routing.attention``) against the layer's centroids. The heads' outputs are concatenated before the
output projection in the order of the profile's implementation: ``tacl`` routing heads first, then
local heads (the TF code's ``attention_nd``, U:1478-1685); ``lucidrains`` local heads first, then
routing heads (lucidrains ``SelfAttention``, R:568-581). The order only fixes which slice of the
projections each kind of head uses; it matters when porting weights.

Projections. q, k, v and output are ``nn.Linear`` layers (no bias by default, as both
implementations' routing heads) shared by all heads and split per head (lucidrains gives its local
heads a separate ``local_to_qkv``; here one projection serves both kinds, which is the same
function class). With ``shared_qk=True`` the routing heads' keys are their queries (no key
projection for them); local heads always have their own keys. Rotary or relative position terms,
dropout and lucidrains' learned memory key/values are not part of this layer (spec/routing.md).

Centroids. One (R, C, D) set of means per layer (R routing heads), shared by queries and keys, held
with the moving-average statistics as buffers ``means``, ``counts`` and ``sums`` (in
``state_dict``; ``.to()`` moves them and converts them to float64/float32, but a float16/bfloat16
conversion of the layer leaves them in float32, where the moving averages do not stall). They are
initialised by ``routing.init_centroids`` from the layer's generator (``generator``, or one seeded
from the global torch RNG, so ``torch.manual_seed`` makes construction reproducible). After each
forward in training mode (never in eval mode) they are updated with the profile's rule, from the
forward's normalized queries (and keys) and under the means that routed it:
``routing.centroid_statistics`` gives the batch's counts and sums; under an initialized
``torch.distributed`` process group they are summed across ranks (one ``all_reduce``), and
``routing.apply_centroid_statistics`` applies the update, identical on every rank and equal to
the update of the concatenated global batch. (lucidrains averages its batch means across forward
calls and applies them from a backward hook; here every training forward is one update.) Padded
tokens are excluded from the statistics.

Input. ``x`` (B, L, dim) must have the layer's parameter dtype (``TypeError`` otherwise, naming both:
convert one or the other); under ``torch.autocast`` any floating dtype, which autocast casts.

Commitment loss. ``layer.commitment_loss`` (a 0-d tensor, differentiable in the layer's parameters
through the normalized queries and keys) is set by every forward; the training loop adds it. Per
profile: ``tacl`` the sum of the query and the key losses, each ``routing.commitment_loss`` (with
shared QK the query loss twice, as the TF code's ``q_loss + k_loss``, U:2149-2150, U:2166);
``lucidrains`` one loss over the queries and keys concatenated along the sequence (queries alone with
shared QK, R:349-350, R:397).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refattn import checks
from refattn.routing import CentroidState, default_num_clusters, default_window
from refattn.routing.profiles import check_configuration, get_profile

from ..routing.attention import attention
from ..routing.centroids import apply_centroid_statistics, centroid_statistics, check_state, init_centroids
from ..routing.commitment import commitment_loss
from ..routing.local_attention import local_attention
from ..routing.normalize import normalize
from ..tensors import layer_input

__all__ = ["RoutingAttention"]


def _optional_integer(value: Any, name: str) -> int | None:
    return None if value is None else checks.integer_in_range(value, name, low=1)


class RoutingAttention(nn.Module):
    """Multi-head attention with routing heads (online k-means clusters) and local heads.

    Args:
        dim: model width of the input and output.
        heads: total number of heads H (routing heads R = H - ``local_heads`` >= 1).
        num_clusters: C, centroids per routing head; None derives it from ``max_seq_len``
            (``routing.default_num_clusters``, round(sqrt(max_seq_len))).
        window: W, tokens per cluster; None: ceil(L / C) per call. Clamped to L for shorter inputs.
        causal: keys j <= i only (by position), in routing and local heads.
        shared_qk: the routing heads' keys are their queries.
        local_heads: how many of the heads run blocked local attention.
        local_block: block size of the local heads (a query sees its block and the previous one,
            and the next one when not causal).
        profile: ``"tacl"`` (default) or ``"lucidrains"`` (rejects causal with unshared QK).
        max_seq_len: only used to derive ``num_clusters`` when that is None.
        dim_head: per-head width D; default ``dim // heads`` (then ``dim`` must be divisible).
        decay: λ of the centroid moving averages (0.999).
        commitment: β of the commitment loss (1e-4).
        bias: whether the q/k/v/out projections have a bias (default False).
        generator: ``torch.Generator`` for the initial centroids (CPU); default a fresh one seeded
            from the global torch RNG.
        process_group: the ``torch.distributed`` group whose ranks share the centroids (default the
            world); ``sync_centroids=False`` turns the all-reduce off.

    Attributes:
        means (R, C, D), counts (R, C), sums (R, C, D): the centroid state (buffers).
        commitment_loss: 0-d tensor of the latest forward (None before the first).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        num_clusters: int | None = None,
        window: int | None = None,
        causal: bool = False,
        shared_qk: bool = False,
        local_heads: int = 0,
        local_block: int = 128,
        profile: str = "tacl",
        max_seq_len: int | None = None,
        *,
        dim_head: int | None = None,
        decay: float = 0.999,
        commitment: float = 1e-4,
        bias: bool = False,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        sync_centroids: bool = True,
    ) -> None:
        super().__init__()
        dim = checks.integer_in_range(dim, "dim", low=1)
        heads = checks.integer_in_range(heads, "heads", low=1)
        local_heads = checks.integer_in_range(local_heads, "local_heads", low=0, high=heads - 1)
        if dim_head is None:
            if dim % heads:
                raise ValueError(
                    f"dim, heads: expected dim divisible by heads (or give dim_head), got dim={dim}, heads={heads}")
            dim_head = dim // heads
        dim_head = checks.integer_in_range(dim_head, "dim_head", low=1)
        max_seq_len = _optional_integer(max_seq_len, "max_seq_len")
        num_clusters = _optional_integer(num_clusters, "num_clusters")
        if num_clusters is None:
            if max_seq_len is None:
                raise ValueError(
                    "num_clusters: expected an integer >= 1, or max_seq_len to derive it from; got neither")
            num_clusters = default_num_clusters(max_seq_len)
        self.window = _optional_integer(window, "window")
        self.local_block = checks.integer_in_range(local_block, "local_block", low=1)
        profile = get_profile(profile)
        self.profile = profile.name
        self.causal = checks.flag(causal, "causal")
        self.shared_qk = checks.flag(shared_qk, "shared_qk")
        check_configuration(profile, self.causal, self.shared_qk)
        self.decay = checks.real_number(decay, "decay", low=0.0, high=1.0)
        self.commitment = checks.real_number(commitment, "commitment", low=0.0)
        bias = checks.flag(bias, "bias")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.local_heads = local_heads
        self.routing_heads = heads - local_heads
        self.num_clusters = num_clusters
        self.max_seq_len = max_seq_len
        self.process_group = process_group
        self.sync_centroids = checks.flag(sync_centroids, "sync_centroids")

        key_heads = local_heads + (0 if self.shared_qk else self.routing_heads)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_k = nn.Linear(dim, key_heads * dim_head, bias=bias) if key_heads else None
        self.to_v = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)

        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        state = init_centroids(self.routing_heads, num_clusters, dim_head, rng=generator, profile=self.profile,
                               dtype=torch.get_default_dtype(), device="cpu")
        self.register_buffer("means", state.means)
        self.register_buffer("counts", state.counts)
        self.register_buffer("sums", state.sums)
        self.commitment_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads} (routing {self.routing_heads}, local {self.local_heads}), "
                f"dim_head={self.dim_head}, num_clusters={self.num_clusters}, window={self.window}, "
                f"causal={self.causal}, shared_qk={self.shared_qk}, local_block={self.local_block}, "
                f"profile={self.profile!r}, decay={self.decay}, commitment={self.commitment}")

    # ----------------------------------------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.half()``, ``.bfloat16()``…: the centroid buffers follow the device, and a
        float16/bfloat16 conversion leaves them in float32. In half precision the moving averages
        would stall: with λ = 0.999, λ·count rounds back to count in bfloat16."""
        module = super()._apply(fn, *args, **kwargs)
        for name in ("means", "counts", "sums"):
            buffer = getattr(self, name)
            if buffer.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buffer.float())
        return module

    @property
    def centroid_state(self) -> CentroidState:
        """The current state as a ``CentroidState`` (the buffers themselves, not copies)."""
        return CentroidState(self.means, self.counts, self.sums)

    def load_centroid_state(self, state: CentroidState) -> None:
        """Copy a ``CentroidState`` (for example ``routing.init_centroids`` or a lucidrains model's
        ``kmeans.means`` with zero counts) into the buffers."""
        state = check_state(state)
        for buffer, value in zip((self.means, self.counts, self.sums), state, strict=True):
            if tuple(buffer.shape) != tuple(value.shape):
                raise ValueError(f"state: expected shapes {tuple(self.means.shape)}, {tuple(self.counts.shape)}, "
                                 f"{tuple(self.sums.shape)}, got {[tuple(x.shape) for x in state]}")
        with torch.no_grad():
            for buffer, value in zip((self.means, self.counts, self.sums), state, strict=True):
                buffer.copy_(value)

    def _syncing(self) -> bool:
        """Whether the centroid statistics are all-reduced: an initialized group of more than one rank."""
        if not self.sync_centroids or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return False
        return torch.distributed.get_world_size(self.process_group) > 1

    @torch.no_grad()
    def _update_centroids(self, q_hat: torch.Tensor, k_hat: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """One update from this forward's statistics, summed over the ranks when distributed."""
        state = self.centroid_state
        statistics = centroid_statistics(state, q_hat, k_hat, key_padding_mask=mask)
        if self._syncing():
            flat = torch.cat([t.reshape(-1) for pair in statistics for t in pair])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self.process_group)
            pieces, offset = [], 0
            for counts, sums in statistics:
                n_counts, n_sums = counts.numel(), sums.numel()
                pieces.append((flat[offset:offset + n_counts].view_as(counts),
                               flat[offset + n_counts:offset + n_counts + n_sums].view_as(sums)))
                offset += n_counts + n_sums
            statistics = tuple(pieces)
        new = apply_centroid_statistics(state, statistics, profile=self.profile, decay=self.decay)
        self.means.copy_(new.means)
        self.counts.copy_(new.counts)
        self.sums.copy_(new.sums)

    def _loss(self, q_hat: torch.Tensor, k_hat: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        means = self.means.detach()
        loss = commitment_loss
        if self.profile == "lucidrains":
            if k_hat is None:
                return loss(q_hat, means, beta=self.commitment, key_padding_mask=mask)
            both = None if mask is None else torch.cat([mask, mask], dim=1)
            return loss(torch.cat([q_hat, k_hat], dim=2), means, beta=self.commitment, key_padding_mask=both)
        q_loss = loss(q_hat, means, beta=self.commitment, key_padding_mask=mask)
        k_loss = q_loss if k_hat is None else loss(k_hat, means, beta=self.commitment, key_padding_mask=mask)
        return q_loss + k_loss

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, count, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, return_loss: bool = False):
        """x (B, L, dim) -> (B, L, dim); with ``return_loss=True`` also the commitment loss.

        ``key_padding_mask`` (B, L) bool, True = padding: padded positions are neither attended to,
        nor routed, nor counted in the centroid statistics, and their output is the projection of 0.
        """
        x = layer_input(x, self.dim, self.to_q.weight.dtype)
        return_loss = checks.flag(return_loss, "return_loss")
        batch, length, _ = x.shape
        routing, local = self.routing_heads, self.local_heads
        q = self._heads(self.to_q(x), self.heads)
        v = self._heads(self.to_v(x), self.heads)
        k = None if self.to_k is None else self._heads(self.to_k(x), self.to_k.out_features // self.dim_head)
        local_first = self.profile == "lucidrains"
        # head slices: tacl [routing | local], lucidrains [local | routing]; keys: [local | routing]
        r_slice = slice(local, None) if local_first else slice(0, routing)
        l_slice = slice(0, local) if local_first else slice(routing, None)
        qr, vr = q[:, r_slice], v[:, r_slice]
        kr = None if self.shared_qk else k[:, local:]
        window = min(self.window or default_window(length, self.num_clusters), length)
        routed = attention(qr, kr, vr, self.means, window=window, causal=self.causal, shared_qk=self.shared_qk,
                           profile=self.profile, key_padding_mask=key_padding_mask)
        outputs = [routed]
        if local:
            ql, vl, kl = q[:, l_slice], v[:, l_slice], k[:, :local]
            local_out = local_attention(ql, kl, vl, min(self.local_block, length), causal=self.causal,
                                        key_padding_mask=key_padding_mask)
            outputs = [local_out, routed] if local_first else [routed, local_out]
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else routed
        out = self.to_out(out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head))

        q_hat = normalize(qr, profile=self.profile)
        k_hat = None if kr is None else normalize(kr, profile=self.profile)
        self.commitment_loss = self._loss(q_hat, k_hat, key_padding_mask)
        if self.training:
            self._update_centroids(q_hat.detach(), None if k_hat is None else k_hat.detach(), key_padding_mask)
        return (out, self.commitment_loss) if return_loss else out
