"""Input checks particular to the Routing steps (the shared ones are in :mod:`refattn._validation`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn._validation import expect_shape, float_array, index_array

from .profiles import Profile


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
