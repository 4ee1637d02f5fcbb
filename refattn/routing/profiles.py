"""The per-profile constants of Routing attention, in one place (spec/routing.md, "Profiles").

Two readings of the algorithm are reproduced:

- ``"tacl"`` (the default): the authors' TensorFlow code (google-research ``routing_transformer``);
- ``"lucidrains"``: lucidrains/routing-transformer 1.6.1 (PyPI), so that its users get the same numbers.

Every step that behaves differently per profile reads its constants from :data:`PROFILES`; no other
module spells one of these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refattn.checks import one_of

__all__ = ["Profile", "PROFILES", "PROFILE_NAMES", "get_profile", "check_configuration"]


@dataclass(frozen=True)
class Profile:
    """What one profile does at each step where the two readings differ."""

    name: str
    norm: str
    """``"layernorm"`` (mean 0, variance 1 over D, no scale or bias) or ``"l2"`` (unit L2 norm)."""
    norm_eps: float
    """LayerNorm: added to the variance under the square root; L2: lower clamp of the norm."""
    logits_use_normalized: bool
    """True: the attention logits use the normalized q and k; False: raw q against raw k
    (against the normalized k̂ = normalize(q) when QK is shared)."""
    scaled_logits: bool
    """True: logits are multiplied by 1/sqrt(D); False: no scale."""
    self_logit: float | None
    """With shared QK, the logit of a token on itself is replaced by this constant (None: not)."""
    combine_eps: float
    """out_t = sum of the token's cluster outputs / (count_t + combine_eps)."""
    update: str
    """``"vqvae_ema"`` (EMA of counts and sums, Laplace smoothing) or ``"spherical_mean"``."""
    laplace_eps: float
    """Laplace smoothing of the EMA counts (``vqvae_ema`` only)."""
    causal_unshared: bool
    """Whether causal attention with unshared QK is modelled (lucidrains adds learned memory
    key/values in that configuration, which refattn does not model)."""


PROFILES: dict[str, Profile] = {
    "tacl": Profile(
        name="tacl",
        norm="layernorm",
        norm_eps=1e-6,  # U:441, U:468-469
        logits_use_normalized=True,  # U:2116-2118 reassign q, k
        scaled_logits=False,  # U:2501, no 1/sqrt(d) after the LayerNorm
        self_logit=None,  # a token may attend to itself
        combine_eps=1e-2,  # U:2668
        update="vqvae_ema",  # U:3019-3037
        laplace_eps=1e-5,  # U:2967
        causal_unshared=True,
    ),
    "lucidrains": Profile(
        name="lucidrains",
        norm="l2",
        norm_eps=1e-12,  # F.normalize default, R:344
        logits_use_normalized=False,  # R:407 raw q; R:403 k̂ when shared
        scaled_logits=True,  # R:417
        self_logit=-5e4,  # TOKEN_SELF_ATTN_VALUE, R:20, R:440-445
        combine_eps=1e-5,  # scatter_mean, R:85-88
        update="spherical_mean",  # kmeans_iter + ema_inplace, R:271-286, R:329-337
        laplace_eps=0.0,  # unused
        causal_unshared=False,  # R:378 adds memory key/values there
    ),
}

PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)


def get_profile(profile: str | Profile) -> Profile:
    """The :class:`Profile` named ``profile`` (a :class:`Profile` is returned as it is); ``ValueError``
    naming ``profile`` if unknown."""
    if isinstance(profile, Profile):
        return profile
    return PROFILES[one_of(profile, "profile", PROFILE_NAMES)]


def check_configuration(profile: Profile, causal: Any, shared_qk: Any) -> None:
    """Reject the configurations a profile does not model (lucidrains: causal with unshared QK)."""
    if causal and not shared_qk and not profile.causal_unshared:
        raise ValueError(
            f"profile: {profile.name!r} does not support causal=True with shared_qk=False: "
            "lucidrains/routing-transformer adds learned memory key/values to every cluster in that "
            "configuration, which refattn does not model; use shared_qk=True, causal=False or profile='tacl'"
        )
