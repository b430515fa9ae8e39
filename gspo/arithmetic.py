"""The built-in verifiable task: small-integer arithmetic with an exact answer.

Prompts look like `12+7=` and the reference is the integer answer as a string. Deterministic from a seed,
so the training, held-out and warm-start sets are reproducible and disjoint by construction (each draws from
its own seed stream and the held-out set's problems are removed from the others).
"""

from __future__ import annotations

import random

from gspo.example import Example

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def problem_space(max_operand: int, ops: str) -> list[tuple[int, str, int]]:
    return [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]


def make_examples(
    n: int, seed: int = 0, max_operand: int = 20, ops: str = "+-", exclude: set[str] | frozenset = frozenset()
) -> list[Example]:
    """n problems drawn without replacement from the problem space, skipping prompts in `exclude`."""
    if not ops or set(ops) - set(_OPS):
        raise ValueError(f"arithmetic ops must be drawn from '+-*', got {ops!r}")
    space = [p for p in problem_space(max_operand, ops) if f"{p[0]}{p[1]}{p[2]}=" not in exclude]
    if n > len(space):
        raise ValueError(
            f"arithmetic: asked for {n} problems but only {len(space)} exist with "
            f"max_operand={max_operand}, ops={ops!r}"
        )
    rng = random.Random(seed)
    out = []
    for a, op, b in rng.sample(space, n):
        prompt = f"{a}{op}{b}="
        out.append(Example(id=f"arithmetic/{prompt}", prompt=prompt, reference=str(_OPS[op](a, b)), task="arithmetic"))
    return out


def test_set(n: int, seed: int = 0, max_operand: int = 20, ops: str = "+-") -> list[Example]:
    """The evaluation problems: drawn first, from their own seed stream, so no other split can contain them."""
    return make_examples(n, seed + 3, max_operand, ops)


def split(
    train: int, held_out: int, seed: int = 0, max_operand: int = 20, ops: str = "+-", warm_start: int = 0, test: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, held_out, warm_start), all disjoint from `test_set(test, ...)`; held-out problems (used to pick
    the best checkpoint) never appear in train or warm start either.

    Train and warm-start sizes are capped at the problems left after the held-out and test sets; train=0 takes
    them all.
    """
    excl = {e.prompt for e in test_set(test, seed, max_operand, ops)} if test else set()
    held = make_examples(held_out, seed + 1, max_operand, ops, exclude=excl)
    excl |= {e.prompt for e in held}
    left = len(problem_space(max_operand, ops)) - len(excl)
    tr = make_examples(min(train, left) if train else left, seed, max_operand, ops, exclude=excl)
    ws = make_examples(min(warm_start, left), seed + 2, max_operand, ops, exclude=excl) if warm_start else []
    return tr, held, ws
