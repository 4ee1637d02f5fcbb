"""Input checks particular to the FSAT steps (the shared ones are in :mod:`refattn._validation`)."""

from __future__ import annotations


def length_from_offsets(count: int, name: str) -> int:
    """L from the size 2L - 1 of an offset axis, or raise naming ``name`` if that size is even or 0."""
    if count < 1 or count % 2 == 0:
        raise ValueError(
            f"{name}: expected 2L - 1 offsets along axis 2 (an odd number, L >= 1), got {count}"
        )
    return (count + 1) // 2
