"""Verifiable rewards: pure functions `(completion, example) -> RewardResult`, registered by task name.

An example is anything with `.reference` (the gold answer / test program / label) and `.meta` (a dict);
`gspo.data.Example` is the usual one. Rewards never raise into the caller: `score` turns an exception
into a zero with the reason recorded, so one bad completion cannot stop training or evaluation.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class RewardResult:
    score: float
    verdict: str = "wrong"  # correct | wrong | no_answer | error | timeout
    extracted: Any = None
    reason: str = ""


RewardFn = Callable[[str, Any], RewardResult]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return deco


@contextlib.contextmanager
def registered(name: str, fn: RewardFn) -> Iterator[RewardFn]:
    """`fn` registered as `name` for the block only (a test's reward, one tried out in a notebook); a name
    already taken is refused rather than shadowed."""
    if name in _REGISTRY:
        raise ValueError(f"reward {name!r} is already registered")
    _REGISTRY[name] = fn
    try:
        yield fn
    finally:
        del _REGISTRY[name]


def _import_all() -> None:
    """Rewards live in the modules of this package and register their names when imported; importing them
    all (once, on the first name not registered yet) keeps the decorators the only list of rewards."""
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


def get(name: str) -> RewardFn:
    if name not in _REGISTRY:
        _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def _checked(name: str, options: dict) -> RewardFn:
    """The reward `name`, after checking it takes `options` (e.g. humaneval's timeout): a misspelt or
    misplaced option is the caller's bug and raises, instead of scoring every sample as an error."""
    fn = get(name)
    try:
        inspect.signature(fn).bind("", None, **options)
    except TypeError as e:
        raise TypeError(f"reward {name!r} takes no such options {sorted(options)}: {e}") from None
    return fn


def score(name: str, completion: str, example: Any, **options: Any) -> RewardResult:
    """The reward's verdict; `options` go to the reward (humaneval: `timeout`, seconds per program)."""
    fn = _checked(name, options)
    try:
        result = fn(completion, example, **options)
    except Exception as e:  # a reward bug or hostile input must cost one sample, not the run
        return RewardResult(0.0, "error", None, f"{type(e).__name__}: {e}"[:500])
    return result


def score_batch(
    name: str, completions: Sequence[str], examples: Sequence[Any], workers: int = 1, **options: Any
) -> list[RewardResult]:
    """Score completions[i] against examples[i]; `workers` > 1 runs them in threads (sandboxed code rewards
    spend their time waiting on child processes, so threads overlap them); `options` as for `score`."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    _checked(name, options)
    if workers <= 1:
        return [score(name, c, e, **options) for c, e in zip(completions, examples)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda ce: score(name, *ce, **options), zip(completions, examples)))
