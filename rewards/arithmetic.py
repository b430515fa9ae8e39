"""Exact-match reward for the built-in arithmetic task: the whole completion must be the integer answer.

Exact match (not "some number somewhere") is the task's definition: the policy must also learn to stop.
"""

from __future__ import annotations

import re
from typing import Any

from rewards import RewardResult, register

_ANSWER = re.compile(r"\s*(-?\d{1,12})\.?\s*")


@register("arithmetic")
def arithmetic_reward(completion: str, example: Any) -> RewardResult:
    m = _ANSWER.fullmatch(completion[:64]) if len(completion) <= 64 else None
    if not m:
        return RewardResult(0.0, "no_answer", None, "completion is not a bare integer")
    got, want = int(m.group(1)), int(example.reference)
    if got == want:
        return RewardResult(1.0, "correct", str(got), "")
    return RewardResult(0.0, "wrong", str(got), f"expected {want}")
