"""Routing step 7: centroid state, nearest-centroid assignment and the k-means update
(spec/routing.md, step 7).

Everything is functional: :func:`update_centroids` returns a new :class:`CentroidState` and
leaves its input alone; :func:`init_centroids` draws only from the Generator it is given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refattn import checks
from refattn.checks import as_float64

from .normalize import normalize_core
from .profiles import Profile, get_profile
from .similarity import similarity_core

__all__ = [
    "CentroidState",
    "assign",
    "init_centroids",
    "update_centroids",
    "check_assign",
    "check_init_centroids",
    "check_update_centroids",
    "assign_core",
    "init_centroids_core",
    "update_centroids_core",
]


class CentroidState(NamedTuple):
    """The k-means state of one routing layer, shared by its queries and keys.

    - ``means`` (H, C, D): the centroids μ used for routing;
    - ``counts`` (H, C): moving average of how many tokens chose each centroid (``tacl``);
    - ``sums`` (H, C, D): moving average of the sum of those tokens (``tacl``).

    The ``lucidrains`` profile uses ``means`` only and returns ``counts`` and ``sums`` unchanged.
    """

    means: np.ndarray
    counts: np.ndarray
    sums: np.ndarray


def check_assign(x_hat: Any, centroids: Any, key_padding_mask: Any = None) -> tuple[Any, Any, Any]:
    """Validate the arguments of :func:`assign`; returns them in that order."""
    x_hat, centroids, key_padding_mask = checks.arrays(x_hat=x_hat, centroids=centroids,
                                                       key_padding_mask=key_padding_mask)
    x_hat = checks.sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = checks.centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    mask = checks.padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    return x_hat, centroids, mask


def assign_core(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> Any:
    """:func:`assign` of validated arrays of one floating dtype (the similarities are compared in it)."""
    xp = checks.array_namespace(x_hat, centroids)
    scores = similarity_core(x_hat, centroids)
    labels = xp.argmax(scores, axis=-1).astype(np.int64)  # first maximum: the lower index
    if key_padding_mask is not None:
        labels[xp.broadcast_to(key_padding_mask[:, None, :], labels.shape)] = -1
    return labels


def assign(x_hat: Any, centroids: Any, *, key_padding_mask: Any = None) -> np.ndarray:
    """Nearest centroid of every token, by the largest similarity x̂_t · μ_c.

        a[b, h, t] = argmax_c x_hat[b, h, t] · centroids[h, c]      (ties: the lower c)

    This argmax is used only by the k-means update and the commitment loss; attention membership
    is the balanced top-W of :func:`route`.

    Args:
        x_hat: (B, H, L, D) normalized tokens; centroids: (H, C, D).
        key_padding_mask: optional bool (B, L), True = padding.

    Returns:
        (B, H, L) int64 in [0, C), -1 at padded positions.
    """
    x_hat, centroids, key_padding_mask = check_assign(x_hat, centroids, key_padding_mask)
    x_hat, centroids = as_float64(x_hat, centroids)
    return assign_core(x_hat, centroids, key_padding_mask=key_padding_mask)


def check_init_centroids(
    num_heads: Any, num_clusters: Any, dim: Any, rng: Any, profile: Any = "tacl"
) -> tuple[int, int, int, np.random.Generator, Profile]:
    """Validate the arguments of :func:`init_centroids`; returns them in that order."""
    profile = get_profile(profile)
    heads = checks.integer_in_range(num_heads, "num_heads", low=1)
    clusters = checks.integer_in_range(num_clusters, "num_clusters", low=1)
    dim = checks.integer_in_range(dim, "dim", low=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    return heads, clusters, dim, rng, profile


def init_centroids_core(
    num_heads: int, num_clusters: int, dim: int, *, rng: np.random.Generator, profile: Profile
) -> CentroidState:
    """:func:`init_centroids` of validated arguments: NumPy float64 arrays (a backend moves them)."""
    means = normalize_core(rng.standard_normal((num_heads, num_clusters, dim)), profile=profile)
    xp = checks.array_namespace(means)
    return CentroidState(means, xp.zeros((num_heads, num_clusters)), means.copy())


def init_centroids(
    num_heads: int, num_clusters: int, dim: int, *, rng: np.random.Generator, profile: str = "tacl"
) -> CentroidState:
    """Initial centroids from a standard normal draw of the given Generator.

    ``tacl`` (U:2908-2935): means = LN(g) with g ~ N(0, 1) of shape (H, C, D), LayerNorm without
    scale or bias, eps 1e-6; counts = 0; sums = means (the TF code's ``ema_means`` starts as the
    initial means). ``lucidrains``: means = g / ||g|| (unit rows), counts = 0, sums = means
    (unused). lucidrains' own data-dependent initialisation (10 spherical k-means iterations on the
    first batch, R:304-327) is not reproduced: to continue from a lucidrains model, copy its
    ``kmeans.means`` into a :class:`CentroidState`.

    The draw is ``rng.standard_normal((H, C, D))``, one call, so the result is a function of the
    Generator's state only.

    Returns:
        CentroidState(means (H, C, D), counts (H, C), sums (H, C, D)), float64.
    """
    num_heads, num_clusters, dim, rng, profile = check_init_centroids(num_heads, num_clusters, dim, rng, profile)
    return init_centroids_core(num_heads, num_clusters, dim, rng=rng, profile=profile)


def _state(state: Any) -> CentroidState:
    """Validate a :class:`CentroidState` (any 3-tuple of means, counts, sums); arrays unchanged."""
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    means, counts, sums = checks.arrays(**{"state.means": state[0], "state.counts": state[1], "state.sums": state[2]})
    means = checks.centroid_array(means, None, None, "state.means")
    heads, clusters, dim = means.shape
    counts = checks.float_array(counts, "state.counts", rank=2, axes="(H, C)")
    checks.expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
    sums = checks.float_array(sums, "state.sums", rank=3, axes="(H, C, D)")
    checks.expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
    return CentroidState(means, counts, sums)


def _statistics(x_hat: Any, means: Any, mask: Any) -> tuple[Any, Any]:
    """Per head: N_c = tokens whose nearest centroid is c, S_c = their sum (padding excluded)."""
    xp = checks.array_namespace(x_hat, means)
    heads, clusters, _ = means.shape
    labels = assign_core(x_hat, means, key_padding_mask=mask)  # (B, H, L)
    keep = labels >= 0
    head_index = xp.broadcast_to(xp.arange(heads)[None, :, None], labels.shape)
    flat = (head_index * clusters + labels)[keep]
    counts = xp.bincount(flat, minlength=heads * clusters).reshape(heads, clusters).astype(x_hat.dtype)
    sums = xp.zeros((heads * clusters, x_hat.shape[3]), dtype=x_hat.dtype)
    xp.add.at(sums, flat, x_hat[keep])
    return counts, sums.reshape(heads, clusters, -1)


def check_update_centroids(
    state: Any, q_hat: Any, k_hat: Any = None, profile: Any = "tacl", key_padding_mask: Any = None,
    decay: Any = 0.999,
) -> tuple[CentroidState, Any, Any, Profile, Any, float]:
    """Validate the arguments of :func:`update_centroids`; returns them in that order."""
    profile = get_profile(profile)
    state = _state(state)
    heads, clusters, dim = state.means.shape
    q_hat, k_hat, key_padding_mask = checks.arrays(q_hat=q_hat, k_hat=k_hat, key_padding_mask=key_padding_mask)
    q_hat = checks.sequence(q_hat, "q_hat", "(B, H, L, D)")
    checks.expect_shape(q_hat, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
    batch, _, length, _ = q_hat.shape
    if k_hat is not None:
        k_hat = checks.sequence(k_hat, "k_hat", "(B, H, L, D)", (batch, heads, length), feature=dim)
    mask = checks.padding_mask(key_padding_mask, batch, length)
    decay = checks.real_number(decay, "decay", low=0.0, high=1.0)
    return state, q_hat, k_hat, profile, mask, decay


def update_centroids_core(
    state: CentroidState, q_hat: Any, k_hat: Any = None, *, profile: Profile, key_padding_mask: Any = None,
    decay: float = 0.999,
) -> CentroidState:
    """:func:`update_centroids` of validated arguments of one floating dtype, computed and returned in it."""
    xp = checks.array_namespace(q_hat, state.means)
    clusters = state.means.shape[1]
    inputs = [q_hat] if k_hat is None else [q_hat, k_hat]
    stats = [_statistics(x, state.means, key_padding_mask) for x in inputs]
    if profile.update == "vqvae_ema":
        counts, sums = state.counts, state.sums
        for batch_counts, batch_sums in stats:
            counts = decay * counts + (1.0 - decay) * batch_counts
            sums = decay * sums + (1.0 - decay) * batch_sums
        total = counts.sum(axis=-1, keepdims=True)
        smoothed = (counts + profile.laplace_eps) / (total + clusters * profile.laplace_eps) * total
        means = xp.where(total[..., None] > 0, sums / xp.where(smoothed > 0, smoothed, 1.0)[..., None], state.means)
        return CentroidState(means, counts, sums)
    batch_counts = sum(c for c, _ in stats)
    batch_sums = sum(s for _, s in stats)
    norm = xp.sqrt(xp.sum(batch_sums * batch_sums, axis=-1, keepdims=True))
    batch_means = xp.where(batch_counts[..., None] > 0, batch_sums / xp.maximum(norm, profile.norm_eps), state.means)
    means = decay * state.means + (1.0 - decay) * batch_means
    return CentroidState(means, state.counts.copy(), state.sums.copy())


OVERFLOWS = {"update_centroids": (checks.Overflow("the centroid update", ("q_hat", "k_hat")),)}


def update_centroids(
    state: CentroidState,
    q_hat: Any,
    k_hat: Any = None,
    *,
    profile: str = "tacl",
    key_padding_mask: Any = None,
    decay: float = 0.999,
) -> CentroidState:
    """One k-means step from a batch of normalized queries (and keys); returns a new state.

    Both profiles first assign every unpadded token to its nearest centroid under the *incoming*
    means (:func:`assign`; queries and keys alike). Padded tokens are excluded from the statistics.

    ``tacl`` (VQ-VAE EMA, U:2959-3058), for x in (q̂, then k̂ when given), per head, with λ = decay:

        N_c = #{(b, t): a(x_bt) = c},  S_c = Σ_{a(x_bt) = c} x_bt
        counts ← λ counts + (1 - λ) N,   sums ← λ sums + (1 - λ) S

    and then, with n = Σ_c counts_c and the Laplace-smoothed counts Ñ_c = (counts_c + ε) n / (n + Cε),
    ε = 1e-5: means_c = sums_c / Ñ_c. (The key update applies after the query update; only the
    means after the last one are returned. If n = 0, nothing has ever been counted and the means
    are kept.) No renormalisation; a cluster never chosen has Ñ_c ≈ ε, so its mean grows: this is
    what the TF code does.

    ``lucidrains`` (R:271-286, R:329-337): x = q̂ (and k̂ concatenated along the sequence when
    given), per head

        m_c = Σ_{b, t: a = c} x_bt / max(||Σ ...||, 1e-12),   m_c = means_c if no token chose c
        means ← λ means + (1 - λ) m

    counts and sums are returned unchanged. (lucidrains includes padding in the statistics and
    averages m over the forward calls since the last update; here one call is one update and a
    ``key_padding_mask`` excludes padding — pass none to match lucidrains.)

    Args:
        state: the current :class:`CentroidState`.
        q_hat: (B, H, L, D) normalized queries; k_hat: optional (B, H, L, D) normalized keys
            (None with shared QK).
        profile: ``"tacl"`` or ``"lucidrains"``.
        key_padding_mask: optional bool (B, L), True = padding.
        decay: λ in [0, 1].

    Returns:
        A new CentroidState, float64.
    """
    state, q_hat, k_hat, profile, key_padding_mask, decay = check_update_centroids(
        state, q_hat, k_hat, profile, key_padding_mask, decay
    )
    state = CentroidState(*as_float64(*state))
    q_hat, k_hat = as_float64(q_hat, k_hat)
    new = update_centroids_core(state, q_hat, k_hat, profile=profile, key_padding_mask=key_padding_mask, decay=decay)
    checks.check_overflows(new, OVERFLOWS["update_centroids"], q_hat=q_hat, k_hat=k_hat)
    return new
