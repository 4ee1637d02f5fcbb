"""Routing step 7: centroid state, nearest-centroid assignment and the k-means update
(spec/routing.md, step 7).

Everything is functional: :func:`update_centroids` returns a new :class:`CentroidState` and
leaves its input alone; :func:`init_centroids` draws only from the Generator it is given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from refattn._validation import expect_shape, float_array, integer_in_range, padding_mask, sequence

from ._checks import centroid_array
from .normalize import _normalize
from .profiles import get_profile

__all__ = ["CentroidState", "assign", "init_centroids", "update_centroids"]


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
    x_hat = sequence(x_hat, "x_hat", "(B, H, L, D)")
    centroids = centroid_array(centroids, x_hat.shape[1], x_hat.shape[3])
    mask = padding_mask(key_padding_mask, x_hat.shape[0], x_hat.shape[2])
    return _assign(x_hat, centroids, mask)


def _assign(x_hat: np.ndarray, centroids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    scores = np.einsum("bhld,hcd->bhlc", x_hat, centroids, optimize=True)
    labels = np.argmax(scores, axis=-1).astype(np.int64)  # first maximum: the lower index
    if mask is not None:
        labels[np.broadcast_to(mask[:, None, :], labels.shape)] = -1
    return labels


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
    spec = get_profile(profile)
    heads = integer_in_range(num_heads, "num_heads", low=1)
    clusters = integer_in_range(num_clusters, "num_clusters", low=1)
    dim = integer_in_range(dim, "dim", low=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    means = _normalize(rng.standard_normal((heads, clusters, dim)), spec)
    return CentroidState(means, np.zeros((heads, clusters)), means.copy())


def _state(state: Any) -> CentroidState:
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(f"state: expected a CentroidState (means, counts, sums), got {type(state).__name__}")
    means = centroid_array(state[0], None, None, "state.means")
    heads, clusters, dim = means.shape
    counts = float_array(state[1], "state.counts", rank=2, axes="(H, C)")
    expect_shape(counts, "state.counts", (heads, clusters), "(H, C)")
    sums = float_array(state[2], "state.sums", rank=3, axes="(H, C, D)")
    expect_shape(sums, "state.sums", (heads, clusters, dim), "(H, C, D)")
    return CentroidState(means, counts, sums)


def _statistics(x_hat, means, mask):
    """Per head: N_c = tokens whose nearest centroid is c, S_c = their sum (padding excluded)."""
    heads, clusters, _ = means.shape
    labels = _assign(x_hat, means, mask)  # (B, H, L)
    keep = labels >= 0
    head_index = np.broadcast_to(np.arange(heads)[None, :, None], labels.shape)
    flat = (head_index * clusters + labels)[keep]
    counts = np.bincount(flat, minlength=heads * clusters).reshape(heads, clusters).astype(np.float64)
    sums = np.zeros((heads * clusters, x_hat.shape[3]))
    np.add.at(sums, flat, x_hat[keep])
    return counts, sums.reshape(heads, clusters, -1)


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
    spec = get_profile(profile)
    state = _state(state)
    heads, clusters, dim = state.means.shape
    q_hat = sequence(q_hat, "q_hat", "(B, H, L, D)")
    expect_shape(q_hat, "q_hat", (None, heads, None, dim), "(B, H, L, D) with H, D of the state")
    batch, _, length, _ = q_hat.shape
    inputs = [q_hat]
    if k_hat is not None:
        inputs.append(sequence(k_hat, "k_hat", "(B, H, L, D)", (batch, heads, length), feature=dim))
    mask = padding_mask(key_padding_mask, batch, length)
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a number in [0, 1], got {decay}")
    stats = [_statistics(x, state.means, mask) for x in inputs]
    if spec.update == "vqvae_ema":
        counts, sums = state.counts, state.sums
        for batch_counts, batch_sums in stats:
            counts = decay * counts + (1.0 - decay) * batch_counts
            sums = decay * sums + (1.0 - decay) * batch_sums
        total = counts.sum(axis=-1, keepdims=True)
        smoothed = (counts + spec.laplace_eps) / (total + clusters * spec.laplace_eps) * total
        means = np.where(total[..., None] > 0, sums / np.where(smoothed > 0, smoothed, 1.0)[..., None], state.means)
        return CentroidState(means, counts, sums)
    batch_counts = sum(c for c, _ in stats)
    batch_sums = sum(s for _, s in stats)
    norm = np.sqrt(np.sum(batch_sums * batch_sums, axis=-1, keepdims=True))
    batch_means = np.where(batch_counts[..., None] > 0, batch_sums / np.maximum(norm, spec.norm_eps), state.means)
    means = decay * state.means + (1.0 - decay) * batch_means
    return CentroidState(means, state.counts.copy(), state.sums.copy())
