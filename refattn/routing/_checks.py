"""Input checks particular to the Routing steps (the shared ones are in :mod:`refattn._validation`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array, index_array, sequence

from .profiles import Profile, get_profile


def centroid_array(centroids: Any, heads: int | None, dim: int | None, name: str = "centroids") -> np.ndarray:
    """Validate the ``(H, C, D)`` centroid means against the heads and feature size of the sequence."""
    array = float_array(centroids, name, rank=3, axes="(H, C, D)")
    expect_shape(array, name, (heads, None, dim), "(H, C, D)")
    if 0 in array.shape:
        raise ValueError(f"{name}: expected every axis of (H, C, D) to be at least 1, got shape {array.shape}")
    return array


def members_array(members: Any, name: str, batch: int, heads: int, length: int) -> np.ndarray:
    """Validate a ``(B, H, C, W)`` int64 member array: entries in [0, L) or -1 (an empty slot)."""
    array = index_array(members, name, rank=4, axes="(B, H, C, W)")
    expect_shape(array, name, (batch, heads, None, None), "(B, H, C, W)")
    if 0 in array.shape:
        raise ValueError(f"{name}: expected every axis of (B, H, C, W) to be at least 1, got shape {array.shape}")
    if array.size and (array.min() < -1 or array.max() >= length):
        raise ValueError(
            f"{name}: expected positions in [0, L) = [0, {length}) or -1 for an empty slot, "
            f"got values in [{array.min()}, {array.max()}]"
        )
    filled = np.sort(array, axis=-1)
    if np.any((np.diff(filled, axis=-1) == 0) & (filled[..., 1:] >= 0)):
        raise ValueError(f"{name}: expected distinct positions within each cluster, got a repeated position")
    return array


def check_shared(k: Any, shared_qk: bool) -> None:
    """With shared QK the keys are the queries: k must be None (and must be given otherwise)."""
    if shared_qk and k is not None:
        raise ValueError("k: expected None with shared_qk=True (the keys are the queries), got an array")
    if not shared_qk and k is None:
        raise ValueError("k: expected a (B, H, L, D) array with shared_qk=False, got None")


def check_configuration(profile: Profile, causal: bool, shared_qk: bool) -> None:
    """Reject the configurations a profile does not model (lucidrains: causal with unshared QK)."""
    if causal and not shared_qk and not profile.causal_unshared:
        raise ValueError(
            f"profile: {profile.name!r} does not support causal=True with shared_qk=False: "
            "lucidrains/routing-transformer adds learned memory key/values to every cluster in that "
            "configuration, which refattn does not model; use shared_qk=True, causal=False or profile='tacl'"
        )


def routed_inputs(
    q: Any, k: Any, v: Any, profile: str, causal: bool, shared_qk: bool
) -> tuple[Profile, bool, bool, np.ndarray, np.ndarray | None, np.ndarray]:
    """The checks shared by the routed-attention entry points: the profile and its configuration,
    k against ``shared_qk``, and q (B, H, L, D), k (B, H, L, D) or None, v (B, H, L, Dv).

    Returns (profile, causal, shared_qk, q, k, v), the arrays as float64.
    """
    spec = get_profile(profile)
    causal, shared_qk = bool(causal), bool(shared_qk)
    check_shared(k, shared_qk)
    check_configuration(spec, causal, shared_qk)
    q = sequence(q, "q", "(B, H, L, D)")
    batch, heads, length, dim = q.shape
    if k is not None:
        k = sequence(k, "k", "(B, H, L, D)", (batch, heads, length), feature=dim)
    v = sequence(v, "v", "(B, H, L, Dv)", (batch, heads, length))
    return spec, causal, shared_qk, q, k, v
