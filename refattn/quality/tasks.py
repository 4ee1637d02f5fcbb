"""The learning benchmark's tasks (spec/quality.md): synthetic, generated in-process from explicit seeds.

Every task draws batches from a ``numpy.random.Generator`` passed in (never a global RNG):

- :class:`Copy`: multi-target copy. Random tokens; at position i one target per lag l, x_{i-l}.
- :class:`ListOps`: LRA-style nested MAX/MIN/MED/SUM_MOD expressions over digits; 10 classes.
- :class:`Recall`: multi-query associative recall: key-value pairs, then queries for their keys.
- :class:`Planted`: a planted band: y_i counts the ones among x_{i+t}, ..., x_{i+t+w-1}.

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
    """A planted band: tokens uniform in {0, 1}; the target at i is the number of ones among
    x_{i + t}, ..., x_{i + t + width - 1} (a class in [0, width]), IGNORE where the band leaves the
    sequence. Not causal. Default t = L/4 + L/16 (ahead of i, beyond L/4) and width 8: the attention
    pattern a solution needs is exactly these ``width`` diagonals, attended evenly."""

    name = "planted"

    def __init__(self, length: int, offset: int | None = None, width: int = 8) -> None:
        self.length = _integer(length, "length", 8)
        self.width = _integer(width, "width", 1)
        offset = self.default_offset(self.length) if offset is None else offset
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not (
                -self.length < offset and offset + self.width - 1 < self.length
                and (offset > 0 or offset + self.width - 1 < 0)):
            raise ValueError(f"offset: expected an integer t with the band t, ..., t + width - 1 = t + "
                             f"{self.width - 1} inside (-length, length) = (-{self.length}, {self.length}) and "
                             f"not containing 0, got {offset!r}")
        self.offset = int(offset)
        self.vocab_size = 2
        self.num_classes = self.width + 1
        self.num_targets = 1
        self.causal = False
        self.true_offsets = tuple(range(self.offset, self.offset + self.width))

    @staticmethod
    def default_offset(length: int) -> int:
        return length // 4 + length // 16

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        tokens = rng.integers(0, 2, size=(batch, self.length), dtype=np.int64)
        return Batch(tokens, self.targets(tokens))

    def targets(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L, 1) targets of tokens (B, L)."""
        length = tokens.shape[1]
        first = max(0, -self.offset)
        stop = length - max(0, self.offset + self.width - 1)
        targets = np.full((*tokens.shape, 1), IGNORE, dtype=np.int64)
        if stop > first:
            window = np.cumsum(np.pad(tokens, ((0, 0), (1, 0))), axis=1)  # window[:, j] = sum of x_0 .. x_{j-1}
            positions = np.arange(first, stop)
            targets[:, positions, 0] = (window[:, positions + self.offset + self.width]
                                        - window[:, positions + self.offset])
        return targets

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "offset": self.offset, "width": self.width}


class Recall(Task):
    """Multi-query associative recall. The first N tokens are N pairs, one token each: pair (key k,
    value v) is token k * values + v, with N distinct keys from ``keys`` and values uniform in
    [0, values); each of the remaining L - N positions holds a query for one of the N keys (uniform),
    token keys * values + k, whose target is the value paired with k. Causal. Where the answer is
    depends on the content only (the pairs are in a random order): no diagonal pattern solves it.
    Defaults: N = keys = 16, values = 16 (vocabulary 272)."""

    name = "recall"

    def __init__(self, length: int, pairs: int = 16, keys: int | None = None, values: int = 16) -> None:
        self.length = _integer(length, "length", 8)
        pairs = _integer(pairs, "pairs", 1)
        if pairs >= self.length:
            raise ValueError(f"pairs: expected an integer in [1, length - 1] = [1, {self.length - 1}] "
                             f"(room for at least one query), got {pairs}")
        keys = pairs if keys is None else _integer(keys, "keys", 1)
        if keys < pairs:
            raise ValueError(f"keys: expected at least pairs = {pairs} distinct keys, got {keys}")
        self.pairs, self.keys, self.values = pairs, keys, _integer(values, "values", 2)
        self.vocab_size = self.keys * self.values + self.keys
        self.num_classes = self.values
        self.num_targets = 1
        self.causal = True

    def sample(self, batch: int, rng: np.random.Generator) -> Batch:
        n, length = self.pairs, self.length
        keys = np.argsort(rng.random((batch, self.keys)), axis=1)[:, :n]  # n distinct keys per sequence
        values = rng.integers(0, self.values, size=(batch, n))
        chosen = rng.integers(0, n, size=(batch, length - n))
        tokens = np.empty((batch, length), dtype=np.int64)
        tokens[:, :n] = keys * self.values + values
        tokens[:, n:] = self.keys * self.values + np.take_along_axis(keys, chosen, axis=1)
        return Batch(tokens, self.targets(tokens))

    def targets(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L, 1) targets of tokens (B, L): at each query, the value paired with its key."""
        n = self.pairs
        value_of = np.zeros((tokens.shape[0], self.keys), dtype=np.int64)  # key -> value, per sequence
        np.put_along_axis(value_of, tokens[:, :n] // self.values, tokens[:, :n] % self.values, axis=1)
        targets = np.full((*tokens.shape, 1), IGNORE, dtype=np.int64)
        queried = tokens[:, n:] - self.keys * self.values
        targets[:, n:, 0] = np.take_along_axis(value_of, queried, axis=1)
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
