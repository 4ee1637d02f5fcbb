"""The learning benchmark's tasks (spec/quality.md): synthetic, generated in-process from explicit seeds.

Every task draws batches from a ``numpy.random.Generator`` passed in (never a global RNG):

- :class:`Copy`: multi-target copy. Random tokens; at position i one target per lag l, x_{i-l}.
- :class:`ListOps`: LRA-style nested MAX/MIN/MED/SUM_MOD expressions over digits; 10 classes.
- :class:`Recall`: multi-query associative recall: key-value pairs, then queries for their keys.
- :class:`Planted`: y_i = (x_{i+t1} + x_{i+t2}) mod V for two planted offsets, one before i, one after.

A :class:`Batch` holds int64 ``tokens`` (B, L), ``targets`` and an optional bool ``padding`` (B, L)
(True = padding). Per-position tasks have targets (B, L, T) with :data:`IGNORE` where a position has
no target; sequence classification (ListOps) has targets (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import listops

__all__ = ["IGNORE", "TASKS", "Batch", "Copy", "ListOps", "Planted", "Recall", "Task", "make_task"]

IGNORE = -100
"""Target value of a position without a target (``torch.nn.functional.cross_entropy``'s ignore_index)."""


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray
    targets: np.ndarray
    padding: np.ndarray | None = None


def _integer(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


class Task:
    """What the model and the trainer need to know about a task.

    Attributes:
        name: the task's name in :data:`TASKS`.
        length: L, tokens per sequence (after padding).
        vocab_size: input tokens are in [0, vocab_size).
        num_classes: classes per target.
        num_targets: targets per position (per-position tasks), or 0 for one label per sequence.
        causal: whether the model must be causal (targets depend on the past only).
        true_offsets: the offsets tau = j - i that the targets depend on (empty when content-based).
    """

    name: str = ""
    length: int
    vocab_size: int
    num_classes: int
    num_targets: int
    causal: bool
    true_offsets: tuple[int, ...] = ()

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The task's parameters, as recorded in the results' JSON."""
        return {"task": self.name, "length": self.length, "vocab_size": self.vocab_size,
                "num_classes": self.num_classes, "num_targets": self.num_targets, "causal": self.causal,
                "true_offsets": list(self.true_offsets)}


class Copy(Task):
    """Multi-target copy: tokens uniform in [0, vocab); target t at position i is x_{i - lags[t]}
    (IGNORE for i < lags[t]). Causal. Default lags for L: L/32, L/8 and 3L/8 (the last beyond L/4)."""

    name = "copy"

    def __init__(self, length: int, lags: tuple[int, ...] | None = None, vocab: int = 16) -> None:
        self.length = _integer(length, "length", 8)
        lags = self.default_lags(self.length) if lags is None else tuple(lags)
        if not lags or len(set(lags)) != len(lags) or any(not 1 <= int(lag) < self.length for lag in lags):
            raise ValueError(f"lags: expected distinct integers in [1, length - 1] = [1, {self.length - 1}], "
                             f"got {lags}")
        self.lags = tuple(int(lag) for lag in lags)
        self.vocab_size = self.num_classes = _integer(vocab, "vocab", 2)
        self.num_targets = len(self.lags)
        self.causal = True
        self.true_offsets = tuple(-lag for lag in self.lags)

    @staticmethod
    def default_lags(length: int) -> tuple[int, ...]:
        return (max(1, length // 32), length // 8, 3 * length // 8)

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        tokens = rng.integers(0, self.vocab_size, size=(batch, self.length), dtype=np.int64)
        return Batch(tokens, self.targets(tokens))

    def targets(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L, len(lags)) targets of tokens (B, L)."""
        targets = np.full((*tokens.shape, len(self.lags)), IGNORE, dtype=np.int64)
        for t, lag in enumerate(self.lags):
            targets[:, lag:, t] = tokens[:, :-lag]
        return targets

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lags": list(self.lags)}


class Planted(Task):
    """Planted offsets: tokens uniform in [0, vocab); the target at i is (x_{i + t1} + x_{i + t2}) mod
    vocab, IGNORE where i + t1 or i + t2 is outside the sequence. Not causal. Default offsets for L:
    t1 = -(L/4 + L/16), t2 = +L/8 (the attention pattern a solution needs is these two diagonals)."""

    name = "planted"

    def __init__(self, length: int, offsets: tuple[int, int] | None = None, vocab: int = 8) -> None:
        self.length = _integer(length, "length", 8)
        offsets = self.default_offsets(self.length) if offsets is None else tuple(offsets)
        if (len(offsets) != 2 or offsets[0] == offsets[1]
                or any(not 1 <= abs(int(t)) < self.length for t in offsets)
                or max(offsets) - min(offsets) >= self.length):
            raise ValueError(f"offsets: expected two distinct non-zero integers t1, t2 with |t| < length and "
                             f"max - min < length = {self.length}, got {offsets}")
        self.offsets = (int(offsets[0]), int(offsets[1]))
        self.vocab_size = self.num_classes = _integer(vocab, "vocab", 2)
        self.num_targets = 1
        self.causal = False
        self.true_offsets = self.offsets

    @staticmethod
    def default_offsets(length: int) -> tuple[int, int]:
        return (-(length // 4 + length // 16), length // 8)

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        tokens = rng.integers(0, self.vocab_size, size=(batch, self.length), dtype=np.int64)
        return Batch(tokens, self.targets(tokens))

    def targets(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L, 1) targets of tokens (B, L)."""
        first = max(0, -min(self.offsets))
        stop = tokens.shape[1] - max(0, max(self.offsets))
        positions = np.arange(first, stop)
        t1, t2 = self.offsets
        targets = np.full((*tokens.shape, 1), IGNORE, dtype=np.int64)
        targets[:, positions, 0] = (tokens[:, positions + t1] + tokens[:, positions + t2]) % self.vocab_size
        return targets

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "offsets": list(self.offsets)}


class Recall(Task):
    """Multi-query associative recall. The first 2N tokens are N pairs (key, value) with distinct keys
    drawn from ``keys`` key tokens [0, keys) and values from ``values`` value tokens [keys, keys +
    values); each of the remaining L - 2N positions holds a query, one of the N keys drawn uniformly;
    its target is the value paired with that key (a class in [0, values)). Causal. Which position
    holds the answer depends on the content only: no diagonal pattern solves it. Default N = L/16,
    keys = max(64, 2N), values = 16."""

    name = "recall"

    def __init__(self, length: int, pairs: int | None = None, keys: int | None = None, values: int = 16) -> None:
        self.length = _integer(length, "length", 8)
        pairs = max(1, self.length // 16) if pairs is None else _integer(pairs, "pairs", 1)
        if 2 * pairs >= self.length:
            raise ValueError(f"pairs: expected an integer in [1, (length - 1) // 2] = [1, {(self.length - 1) // 2}] "
                             f"(room for at least one query), got {pairs}")
        keys = max(64, 2 * pairs) if keys is None else _integer(keys, "keys", 1)
        if keys < pairs:
            raise ValueError(f"keys: expected at least pairs = {pairs} distinct key tokens, got {keys}")
        self.pairs, self.keys, self.values = pairs, keys, _integer(values, "values", 2)
        self.vocab_size = self.keys + self.values
        self.num_classes = self.values
        self.num_targets = 1
        self.causal = True

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        n, length = self.pairs, self.length
        keys = np.argsort(rng.random((batch, self.keys)), axis=1)[:, :n]  # n distinct keys per sequence
        values = rng.integers(0, self.values, size=(batch, n))
        chosen = rng.integers(0, n, size=(batch, length - 2 * n))
        tokens = np.empty((batch, length), dtype=np.int64)
        tokens[:, 0:2 * n:2] = keys
        tokens[:, 1:2 * n:2] = self.keys + values
        tokens[:, 2 * n:] = np.take_along_axis(keys, chosen, axis=1)
        return Batch(tokens, self.targets(tokens))

    def targets(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L, 1) targets of tokens (B, L): at each query, the value class paired with its key."""
        n = self.pairs
        value_of = np.zeros((tokens.shape[0], self.keys), dtype=np.int64)  # key -> value class, per sequence
        np.put_along_axis(value_of, tokens[:, 0:2 * n:2], tokens[:, 1:2 * n:2] - self.keys, axis=1)
        targets = np.full((*tokens.shape, 1), IGNORE, dtype=np.int64)
        targets[:, 2 * n:, 0] = np.take_along_axis(value_of, tokens[:, 2 * n:], axis=1)
        return targets

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pairs": self.pairs, "keys": self.keys, "values": self.values}


class ListOps(Task):
    """ListOps as in the Long Range Arena (:mod:`refattn.quality.listops`): one expression per
    sequence, padded to L, label its value in [0, 10). Not causal. Lengths n with min_length < n <
    max_length; defaults max_length = L, min_length = L / 4 (LRA: 500 < n < 2000 at L = 2000)."""

    name = "listops"

    def __init__(self, length: int, min_length: int | None = None, max_length: int | None = None,
                 max_depth: int = listops.MAX_DEPTH, max_args: int = listops.MAX_ARGS) -> None:
        self.length = _integer(length, "length", 8)
        self.max_length = self.length if max_length is None else _integer(max_length, "max_length", 3)
        if self.max_length > self.length:
            raise ValueError(f"max_length: expected at most length = {self.length} (sequences are not cut), "
                             f"got {self.max_length}")
        self.min_length = self.length // 4 if min_length is None else _integer(min_length, "min_length", 0)
        if self.min_length + 1 >= self.max_length:
            raise ValueError(f"min_length: expected min_length < max_length - 1 = {self.max_length - 1}, "
                             f"got {self.min_length}")
        self.max_depth = _integer(max_depth, "max_depth", 1)
        self.max_args = _integer(max_args, "max_args", 2)
        self.vocab_size = len(listops.VOCABULARY)
        self.num_classes = 10
        self.num_targets = 0
        self.causal = False

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        tokens = np.full((batch, self.length), listops.PAD, dtype=np.int64)
        padding = np.ones((batch, self.length), dtype=bool)
        targets = np.empty(batch, dtype=np.int64)
        for row in range(batch):
            sequence, value = listops.sample_expression(rng, self.min_length, self.max_length, self.max_depth,
                                                        self.max_args)
            tokens[row, :len(sequence)] = sequence
            padding[row, :len(sequence)] = False
            targets[row] = value
        return Batch(tokens, targets, padding)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "min_length": self.min_length, "max_length": self.max_length,
                "max_depth": self.max_depth, "max_args": self.max_args}


TASKS: dict[str, type[Task]] = {"copy": Copy, "listops": ListOps, "recall": Recall, "planted": Planted}
"""The tasks by name (the ``--task`` choices)."""


def make_task(name: str, length: int) -> Task:
    """The task ``name`` at sequence length ``length``, with its default parameters."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name](length)
