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

Dropout (``dropout > 0``, training mode only) is applied to the attention output, i.e. the
concatenated per-head outputs before the output projection, not to the attention weights (the
sparse attention never materialises its weights for backward).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import fsat as _fsat

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
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim, heads: expected dim >= 1 divisible by heads >= 1, got dim={dim}, heads={heads}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
        if cross_dim == "head":
            cross_dim = dim // heads
        if cross_dim is not None and (isinstance(cross_dim, bool) or not isinstance(cross_dim, int) or cross_dim < 1):
            raise ValueError(f"cross_dim: expected 'head', None or an integer >= 1, got {cross_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        for name, value in (("noise_scale", noise_scale), ("noise_final", noise_final)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
                raise ValueError(f"{name}: expected a finite number >= 0 (a Gumbel temperature), got {value!r}")
        if noise_schedule not in self.NOISE_SCHEDULES:
            choices = ", ".join(self.NOISE_SCHEDULES)
            raise ValueError(f"noise_schedule: expected one of {choices}, got {noise_schedule!r}")
        if isinstance(noise_steps, bool) or not isinstance(noise_steps, int) or noise_steps < 1:
            raise ValueError(f"noise_steps: expected an integer >= 1 (training forwards), got {noise_steps!r}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.top_k = top_k
        self.causal = bool(causal)
        self.cross_dim = cross_dim
        self.noise_scale = float(noise_scale)
        self.noise_schedule = noise_schedule
        self.noise_final = float(noise_final)
        self.noise_steps = noise_steps
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.int64))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        features = self.head_dim if cross_dim is None else cross_dim
        self.w = nn.Parameter(torch.ones(heads, features))
        self.cross = nn.Linear(dim, 2 * heads * cross_dim) if cross_dim is not None else None
        self.dropout = nn.Dropout(dropout)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.generator = generator
        self.last_offsets: torch.Tensor | None = None

    def manual_seed(self, seed: int) -> FSATAttention:
        """Reseed the layer's noise generator; returns the layer."""
        self.generator.manual_seed(seed)
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
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor of shape (B, L, dim) with dim = {self.dim}, got {shape}")
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
        out, offsets = _fsat.attention_with_offsets(
            q, k, v, self.w, self.top_k, causal=self.causal, key_padding_mask=key_padding_mask,
            noise=noise, cross_q=cross_q, cross_k=cross_k,
        )
        self.last_offsets = offsets.detach()
        out = out.transpose(1, 2).reshape(batch, length, self.dim)
        return self.out(self.dropout(out))

