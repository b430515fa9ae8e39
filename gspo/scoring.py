"""Rewards of a batch of completions, and the greedy held-out reward that picks checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import rewards
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.rollout import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def score(
    texts: list[str], examples: list[Example], cfg: Config | None = None
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Rewards (B,) of completions `texts` of `examples`, and the rewards grouped per task for metrics.

    Sandboxed tasks (humaneval) run with eval.code_timeout and eval.workers, the settings evaluation uses."""
    e = (cfg or Config()).eval
    scores = [0.0] * len(examples)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    per_task = {}
    for task, rows in by_task.items():
        # Sandboxed programs: the timeout and parallelism evaluation uses, so both judge alike.
        # Sandboxed programs: the timeout and parallelism evaluation uses, so both judge alike.
        workers, options = (e.workers, {"timeout": e.code_timeout}) if task == "humaneval" else (1, {})
        results = rewards.score_batch(task, [texts[i] for i in rows], [examples[i] for i in rows], workers, **options)
        for i, r in zip(rows, results):
            scores[i] = float(r.score)
        per_task[task] = [scores[i] for i in rows]
    return torch.tensor(scores, dtype=torch.float32), per_task


@torch.no_grad()
def greedy_reward(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example], cfg: Config, batch_size: int = 64
) -> float:
    """Mean reward of greedy completions: the held-out score that keeps the best checkpoint."""
    if not examples:
        return float("nan")
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [format_prompt(tok, e, cfg.data.use_chat_template) for e in chunk]
        roll = generate(
            model,
            tok,
            prompts,
            1,
            cfg.gspo.max_new_tokens,
            do_sample=False,
            max_prompt_length=cfg.gspo.max_prompt_length,
            decode=cfg.gspo.decode,
        )
        total += float(score(roll.texts, chunk, cfg)[0].sum())
    return total / len(examples)
