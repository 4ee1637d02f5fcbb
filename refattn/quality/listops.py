"""ListOps expressions with the Long Range Arena's generator rules (spec/quality.md, "ListOps").

The rules of ``lra_benchmarks/data/listops.py`` (google-research/long-range-arena), re-implemented on a
``numpy.random.Generator``:

- a node at depth d < max_depth is a digit with probability 1 - VALUE_P = 0.75, else an operator;
  at depth max_depth it is always a digit; the root has depth 1;
- a digit is uniform in 0..9; an operator node has n ~ uniform{2, ..., max_args} arguments, generated
  first (depth d + 1), and then its operator, uniform over MIN, MAX, MED, SUM_MOD;
- its tokens are the operator, its arguments' tokens and the closing bracket ``]``; the expression's
  length is its number of tokens (LRA's parentheses are not tokens: its tokenizer drops them, and
  LRA issues #6 and #14 settle that ``[`` ops and ``]`` are);
- an expression is kept only when min_length < length < max_length (LRA: 500 and 2000);
- values: MIN, MAX; MED = int(numpy.median(args)) (the mean of the two middle values, truncated, for
  an even count); SUM_MOD = sum(args) mod 10.

Tokens: 0 padding, 1..10 the digits 0..9, then ``[MIN``, ``[MAX``, ``[MED``, ``[SM``, ``]``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["END", "MAX_ARGS", "MAX_DEPTH", "OPERATORS", "PAD", "VALUE_P", "VOCABULARY", "apply", "decode",
           "generate_tree", "sample_expression"]

VOCABULARY = ("<pad>", *(str(d) for d in range(10)), "[MIN", "[MAX", "[MED", "[SM", "]")
PAD = 0
DIGIT = 1  # token of digit d: DIGIT + d
MIN, MAX, MED, SUM_MOD, END = 11, 12, 13, 14, 15
OPERATORS = (MIN, MAX, MED, SUM_MOD)  # LRA's OPERATORS list, in its order
VALUE_P = 0.25
MAX_DEPTH = 10
MAX_ARGS = 10


def apply(operator: int, values: list[int]) -> int:
    """The value of ``operator`` (a token of :data:`OPERATORS`) on argument values in 0..9."""
    if operator == MIN:
        return min(values)
    if operator == MAX:
        return max(values)
    if operator == MED:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
    if operator == SUM_MOD:
        return sum(values) % 10
    raise ValueError(f"operator: expected one of the tokens {OPERATORS}, got {operator!r}")


class _TooLong(Exception):
    """Raised while generating once the expression already has ``limit`` tokens (it will be rejected)."""


def generate_tree(rng: np.random.Generator, depth: int = 1, max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS,
                  limit: int | None = None) -> tuple[list[int], int]:
    """One expression (tokens, value) by LRA's recursion from ``depth``. With ``limit``, generation
    stops (``_TooLong``) once the tokens reach that many: such an expression would be rejected anyway,
    so this changes only how many random numbers a rejected draw consumes, not what is accepted."""
    tokens: list[int] = []
    value = _node(rng, depth, max_depth, max_args, tokens, limit)
    return tokens, value


def _node(rng: np.random.Generator, depth: int, max_depth: int, max_args: int, tokens: list[int],
          limit: int | None) -> int:
    r = rng.random() if depth < max_depth else 1.0
    if limit is not None and len(tokens) >= limit:
        raise _TooLong
    if r > VALUE_P:
        digit = int(rng.integers(10))
        tokens.append(DIGIT + digit)
        return digit
    start = len(tokens)
    tokens.append(-1)  # the operator's slot: LRA draws the operator after the arguments
    count = int(rng.integers(2, max_args + 1))
    values = [_node(rng, depth + 1, max_depth, max_args, tokens, limit) for _ in range(count)]
    operator = OPERATORS[int(rng.integers(len(OPERATORS)))]
    tokens[start] = operator
    tokens.append(END)
    return apply(operator, values)


def sample_expression(rng: np.random.Generator, min_length: int, max_length: int, max_depth: int = MAX_DEPTH,
                      max_args: int = MAX_ARGS) -> tuple[list[int], int]:
    """Draw expressions until one has min_length < length < max_length; returns (tokens, value)."""
    while True:
        try:
            tokens, value = generate_tree(rng, 1, max_depth, max_args, limit=max_length)
        except _TooLong:
            continue
        if min_length < len(tokens) < max_length:
            return tokens, value


def decode(tokens: list[int] | np.ndarray) -> str:
    """The expression as text, padding dropped: ``[MAX 2 9 [MIN 4 7 ] 0 ]``."""
    return " ".join(VOCABULARY[int(t)] for t in tokens if int(t) != PAD)
