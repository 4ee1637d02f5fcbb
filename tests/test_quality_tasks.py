"""The learning benchmark's tasks (refattn/quality/tasks.py, listops.py) against hand-computed cases
and independent oracles: explicit loops, and a recursive ListOps evaluator that parses the tokens."""

from __future__ import annotations

import numpy as np
import pytest

from refattn.quality import listops
from refattn.quality.tasks import IGNORE, Copy, ListOps, Planted, Recall, make_task

X = IGNORE


def test_copy_targets_by_hand():
    task = Copy(8, lags=(1, 3), vocab=10)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    targets = task.targets(tokens)
    assert targets[0, :, 0].tolist() == [X, 3, 1, 4, 1, 5, 9, 2]
    assert targets[0, :, 1].tolist() == [X, X, X, 3, 1, 4, 1, 5]
    assert task.true_offsets == (-1, -3) and task.causal


def test_copy_defaults_reach_beyond_a_quarter():
    assert Copy.default_lags(128) == (4, 16, 48) and 48 >= 128 / 4
    assert Copy.default_lags(512) == (16, 64, 192)
    task = Copy(512)
    batch = task.sample(3, np.random.default_rng(0))
    assert batch.tokens.shape == (3, 512) and batch.targets.shape == (3, 512, 3) and batch.padding is None
    for t, lag in enumerate(task.lags):  # against an explicit loop
        for i in range(512):
            expected = batch.tokens[:, i - lag] if i >= lag else np.full(3, X)
            assert np.array_equal(batch.targets[:, i, t], expected)


def test_planted_band_by_hand_and_by_loop():
    task = Planted(8, offset=2, width=3)
    tokens = np.array([[1, 0, 1, 1, 0, 1, 1, 0]])
    # y_i = x_{i+2} + x_{i+3} + x_{i+4} for i in [0, 3]
    assert task.targets(tokens)[0, :, 0].tolist() == [2, 2, 2, 2, X, X, X, X]
    assert task.true_offsets == (2, 3, 4) and task.num_classes == 4 and not task.causal
    behind = Planted(8, offset=-4, width=2)  # y_i = x_{i-4} + x_{i-3} for i in [4, 7]
    assert behind.targets(tokens)[0, :, 0].tolist() == [X, X, X, X, 1, 1, 2, 1]
    task = Planted(512)
    assert task.offset == 160 and task.true_offsets == tuple(range(160, 168)) and 160 >= 512 / 4
    batch = task.sample(2, np.random.default_rng(0))
    for i in range(512):
        expected = batch.tokens[:, i + 160:i + 168].sum(axis=1) if i + 167 < 512 else np.full(2, X)
        assert np.array_equal(batch.targets[:, i, 0], expected)


def test_recall_targets_by_hand_and_by_loop():
    task = Recall(9, pairs=3, keys=5, values=4)
    # pairs (key 2, value 1) -> token 9, (key 0, value 3) -> 3, (key 4, value 0) -> 16; queries 20 + key
    tokens = np.array([[9, 3, 16, 24, 22, 22, 20, 24]])
    assert task.vocab_size == 25 and task.num_classes == 4
    assert Recall(8, pairs=3, keys=5, values=4).targets(tokens)[0, :, 0].tolist() == [X, X, X, 0, 1, 1, 3, 0]
    batch = task.sample(50, np.random.default_rng(1))
    for row, target in zip(batch.tokens, batch.targets[:, :, 0], strict=True):
        keys, values = row[:3] // 4, row[:3] % 4
        assert len(set(keys.tolist())) == 3 and row[:3].max() < 20 and row[3:].min() >= 20
        for i in range(3, 9):
            (where,) = np.nonzero(keys == row[i] - 20)
            assert len(where) == 1 and target[i] == values[where[0]]
        assert (target[:3] == X).all()


def test_sampling_is_reproducible_from_the_generator():
    for name in ("copy", "listops", "recall", "planted"):
        task = make_task(name, 64)
        a = task.sample(2, np.random.default_rng(7))
        b = task.sample(2, np.random.default_rng(7))
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.targets, b.targets)


# ------------------------------------------------------------------------------------------- ListOps


def evaluate(tokens: list[int]) -> int:
    """An independent recursive evaluator: parses the token list and computes with NumPy's median."""
    names = {listops.MIN: min, listops.MAX: max, listops.MED: lambda v: int(np.median(v)),
             listops.SUM_MOD: lambda v: int(np.sum(v) % 10)}

    def parse(position: int) -> tuple[int, int]:
        token = tokens[position]
        if 1 <= token <= 10:
            return token - 1, position + 1
        assert token in names, f"unexpected token {token} at {position}"
        values, position = [], position + 1
        while tokens[position] != listops.END:
            value, position = parse(position)
            values.append(value)
        return names[token](values), position + 1

    value, end = parse(0)
    assert end == len(tokens)
    return value


def depth(tokens: list[int]) -> int:
    level = deepest = 1
    for token in tokens:
        if token in listops.OPERATORS:
            deepest = max(deepest, level)
            level += 1
        elif token == listops.END:
            level -= 1
    return deepest + (1 if any(t in listops.OPERATORS for t in tokens) else 0)


def test_operators_by_hand():
    assert listops.apply(listops.MED, [4, 1, 3, 2]) == 2  # numpy median 2.5, truncated as LRA's int()
    assert listops.apply(listops.MED, [3, 9]) == 6
    assert listops.apply(listops.MED, [7, 0, 5]) == 5
    assert listops.apply(listops.SUM_MOD, [7, 8, 9]) == 4
    assert listops.apply(listops.MIN, [5, 2, 8]) == 2 and listops.apply(listops.MAX, [5, 2, 8]) == 8
    with pytest.raises(ValueError, match="operator: expected one of the tokens"):
        listops.apply(3, [1])


def test_expression_by_hand():
    text = "[MAX 2 9 [MIN 4 7 ] 0 ]"
    tokens = [listops.VOCABULARY.index(word) for word in text.split()]
    assert evaluate(tokens) == 9 and listops.decode(tokens) == text
    text = "[SM [MED 7 2 2 9 8 8 3 ] 7 ]"  # median 7 -> (7 + 7) mod 10
    assert evaluate([listops.VOCABULARY.index(word) for word in text.split()]) == 4


def test_generated_values_match_the_recursive_evaluator():
    task = ListOps(256, min_length=20, max_length=256)
    batch = task.sample(200, np.random.default_rng(3))
    lengths = (~batch.padding).sum(axis=1)
    assert ((lengths > 20) & (lengths < 256)).all()
    for row, label, n in zip(batch.tokens, batch.targets, lengths, strict=True):
        tokens = row[:n].tolist()
        assert (row[n:] == listops.PAD).all()
        assert evaluate(tokens) == label
        assert depth(tokens) <= listops.MAX_DEPTH
    counts = np.bincount(batch.targets, minlength=10)
    assert counts.sum() == 200 and (counts > 0).sum() >= 8  # all classes occur


def test_argument_counts_and_depth_rule():
    rng = np.random.default_rng(5)
    seen_depths = set()
    for _ in range(300):
        tokens, value = listops.generate_tree(rng, max_depth=4, max_args=3)
        assert evaluate(tokens) == value
        seen_depths.add(depth(tokens))
        open_counts = []  # arguments seen so far by each open operator, innermost last
        for token in tokens:
            if open_counts and token != listops.END:
                open_counts[-1] += 1  # a digit or an operator starts an argument of the innermost operator
            if token in listops.OPERATORS:
                open_counts.append(0)
            elif token == listops.END:
                assert 2 <= open_counts.pop() <= 3
        assert not open_counts
    assert max(seen_depths) == 4  # the depth rule: at max_depth every node is a digit
    assert min(seen_depths) == 1  # the root is a digit with probability 0.75


def test_lra_length_rule_defaults():
    task = ListOps(2000)
    assert (task.min_length, task.max_length, task.max_depth, task.max_args) == (500, 2000, 10, 10)
    task = ListOps(1024)
    assert (task.min_length, task.max_length) == (256, 1024)
    batch = task.sample(4, np.random.default_rng(0))
    lengths = (~batch.padding).sum(axis=1)
    assert ((lengths > 256) & (lengths < 1024)).all()


@pytest.mark.parametrize("make, message", [
    (lambda: Copy(64, lags=(0, 3)), "lags: expected distinct integers in"),
    (lambda: Copy(64, lags=(3, 3)), "lags: expected distinct integers in"),
    (lambda: Planted(64, offset=-2, width=4), "offset: expected an integer t with the band"),
    (lambda: Planted(64, offset=60, width=8), "offset: expected an integer t with the band"),
    (lambda: Recall(16, pairs=16), "pairs: expected an integer in"),
    (lambda: Recall(64, pairs=10, keys=5), "keys: expected at least pairs"),
    (lambda: ListOps(64, max_length=100), "max_length: expected at most length"),
    (lambda: ListOps(64, min_length=63), "min_length: expected min_length"),
    (lambda: Copy(4), "length: expected an integer >= 8"),
    (lambda: make_task("sort", 64), "task: expected one of copy, listops, recall, planted, got 'sort'"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
