"""One example of any task: what the model is asked, what is right, which reward judges it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # the question as plain text; the chat template is applied at tokenisation time
    reference: Any  # JSON-serialisable gold: a number string, a HumanEval problem dict, a label index...
    task: str  # the reward name in the `rewards` registry
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        return cls(
            id=str(d["id"]), prompt=d["prompt"], reference=d["reference"], task=d["task"], meta=d.get("meta") or {}
        )
