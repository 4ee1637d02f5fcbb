"""``FSATAttention``: a multi-head FSAT attention layer (spec/fsat.md) as a ``torch.nn.Module``.

    layer = FSATAttention(dim=256, heads=8, top_k=16, causal=True)
    y = layer(x)                     # x (B, L, dim) -> y (B, L, dim)
    layer.last_offsets               # (B, H, K_eff) int64, the diagonals the last forward used

The layer computes q, k, v with one input projection, runs
``refattn.get_backend("torch").fsat.attention`` per head (with the gradient truncation of step 4)
and applies an output projection. In training mode the selection is Gumbel-top-k: Gumbel noise
drawn from the layer's own generator (``manual_seed`` makes it reproducible, independently of the
global torch RNG), times the temperature T, is added to the scores for the choice of offsets only,
so the K - 1 offsets besides tau = 0 are a sample without replacement from softmax(s / T); in eval
mode there is no noise and the selection is deterministic.

Exploration schedule (spec/fsat.md, "Exploration"): T starts at ``noise_scale`` and, with
``noise_schedule`` "linear" or "cosine", moves to ``noise_final`` over the first ``noise_steps``
training forwards, counted by the buffer ``noise_step`` (saved in ``state_dict``, so a resumed run
continues its schedule); "constant" keeps T = ``noise_scale``. :meth:`noise_temperature` is the T
the next training forward uses.

Cross inputs: with ``cross_dim=None`` the estimator uses q and k themselves (detached inside
``attention``: they learn only through the sparse attention). With ``cross_dim=Dc`` (the default,
``"head"``, is Dc = the head dimension) a separate projection of the *detached* layer input gives
per-head cross inputs of Dc features; it learns only through the estimator path (the bias
s[offsets]), never sending gradient into the backbone. spec/fsat.md, "Exploration", gives the
evidence for the defaults (a separate projection, temperature 0.1, constant).

Input: ``x`` (B, L, dim) must have the layer's parameter dtype (``TypeError`` otherwise, naming both:
convert one or the other); under ``torch.autocast`` any floating dtype, which autocast casts.

Dropout (``dropout > 0``, training mode only) is applied to the attention output, i.e. the
concatenated per-head outputs before the output projection, not to the attention weights (the
sparse attention never materialises its weights for backward).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from refattn import checks

from ..fsat.attention import attention_with_offsets
from ..tensors import layer_input

__all__ = ["FSATAttention"]


class FSATAttention(nn.Module):
    """Multi-head FSAT attention.

    Args:
        dim: model width; must be divisible by ``heads``.
        heads: number of heads H (head dimension D = dim // heads).
        top_k: K, offsets per head (tau = 0 always among them); K_eff = min(K, 2L - 1), causal min(K, L).
        causal: restrict to keys j <= i (candidate offsets tau < 0).
        cross_dim: Dc >= 1, the per-head width of a separate cross projection of the detached input;
            ``"head"`` (default): Dc = dim // heads; None: the cross inputs are q and k.
        dropout: dropout probability on the attention output (before the output projection).
        generator: optional ``torch.Generator`` for the Gumbel noise; by default the layer makes its
            own CPU generator (seeded from the global torch RNG at construction; ``manual_seed``
            reseeds it). Noise is drawn on the generator's device and moved to the input's.
        noise_scale: the Gumbel temperature T >= 0 at the start of training (0: no noise); default 0.1.
        noise_schedule: "constant", "linear" or "cosine": how T moves from ``noise_scale`` to
            ``noise_final`` over ``noise_steps`` training forwards.
        noise_final: T >= 0 after the schedule (ignored by "constant").
        noise_steps: training forwards the schedule takes, an integer >= 1 (ignored by "constant").

    Attributes:
        w: Parameter (H, Dc), initialised to ones.
        last_offsets: (B, H, K_eff) int64 offsets of the latest forward (None before the first).
        noise_step: 0-d int64 buffer, the training forwards so far (drives the schedule).
    """

    NOISE_SCHEDULES = ("constant", "linear", "cosine")

    def __init__(
        self,
        dim: int,
        heads: int,
        top_k: int,
        causal: bool = False,
        cross_dim: int | str | None = "head",
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        noise_scale: float = 0.1,
        noise_schedule: str = "constant",
        noise_final: float = 0.0,
        noise_steps: int = 1,
    ) -> None:
        super().__init__()
        dim = checks.integer_in_range(dim, "dim", low=1)
        heads = checks.integer_in_range(heads, "heads", low=1)
        if dim % heads:
            raise ValueError(f"dim, heads: expected dim divisible by heads, got dim={dim}, heads={heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.top_k = checks.integer_in_range(top_k, "top_k", low=1)
        self.causal = checks.flag(causal, "causal")
        if isinstance(cross_dim, str):  # the one width with a name
            if cross_dim != "head":
                raise ValueError(f"cross_dim: expected 'head', None or an integer >= 1, got {cross_dim!r}")
            cross_dim = self.head_dim
        self.cross_dim = None if cross_dim is None else checks.integer_in_range(cross_dim, "cross_dim", low=1)
        dropout = checks.real_number(dropout, "dropout", low=0.0, high=1.0)
        if dropout == 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.noise_scale = checks.real_number(noise_scale, "noise_scale", low=0.0)
        self.noise_schedule = checks.one_of(noise_schedule, "noise_schedule", self.NOISE_SCHEDULES)
        self.noise_final = checks.real_number(noise_final, "noise_final", low=0.0)
        self.noise_steps = checks.integer_in_range(noise_steps, "noise_steps", low=1)
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.int64))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        features = self.head_dim if self.cross_dim is None else self.cross_dim
        self.w = nn.Parameter(torch.ones(heads, features))
        self.cross = nn.Linear(dim, 2 * heads * self.cross_dim) if self.cross_dim is not None else None
        self.dropout = nn.Dropout(dropout)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.generator = generator
        self.last_offsets: torch.Tensor | None = None

    def manual_seed(self, seed: int) -> FSATAttention:
        """Reseed the layer's noise generator; returns the layer."""
        self.generator.manual_seed(checks.integer_in_range(seed, "seed", low=-(2**63), high=2**64 - 1))
        return self

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, top_k={self.top_k}, causal={self.causal}, "
            f"cross_dim={self.cross_dim}, dropout={self.dropout.p}, noise_scale={self.noise_scale}, "
            f"noise_schedule={self.noise_schedule!r}, noise_final={self.noise_final}, noise_steps={self.noise_steps}"
        )

    def noise_temperature(self) -> float:
        """T of the next training forward: ``noise_scale``, moved towards ``noise_final`` by the schedule."""
        if self.noise_schedule == "constant":
            return self.noise_scale
        progress = min(1.0, int(self.noise_step) / self.noise_steps)
        if self.noise_schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.noise_scale + (self.noise_final - self.noise_scale) * progress

    def _split(self, x: torch.Tensor, width: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, width).transpose(1, 2)  # (B, H, L, width)

    def gumbel_noise(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, H, 2L - 1) standard Gumbel noise from the layer's generator: -log(E), E ~ Exp(1)."""
        shape = (batch, self.heads, 2 * length - 1)
        draw = torch.empty(shape, dtype=torch.float64, device=self.generator.device)
        draw.exponential_(generator=self.generator)
        noise = -torch.log(draw.clamp_min(torch.finfo(torch.float64).tiny))
        return noise.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim), optional bool key_padding_mask (B, L) (True = padding) -> (B, L, dim)."""
        x = layer_input(x, self.dim, self.qkv.weight.dtype)
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (self._split(t, self.head_dim) for t in (q, k, v))
        cross_q = cross_k = None
        if self.cross is not None:
            a, b = self.cross(x.detach()).chunk(2, dim=-1)  # step 4: no gradient into the backbone
            cross_q, cross_k = self._split(a, self.cross_dim), self._split(b, self.cross_dim)
        noise = None
        if self.training:
            temperature = self.noise_temperature()
            self.noise_step += 1
            if temperature > 0.0:
                dtype = torch.float32 if x.dtype != torch.float64 else x.dtype
                noise = self.gumbel_noise(batch, length, x.device, dtype) * temperature
        out, offsets = attention_with_offsets(
            q, k, v, self.w, self.top_k, causal=self.causal, key_padding_mask=key_padding_mask,
            noise=noise, cross_q=cross_q, cross_k=cross_k,
        )
        self.last_offsets = offsets.detach()
        out = out.transpose(1, 2).reshape(batch, length, self.dim)
        return self.out(self.dropout(out))

