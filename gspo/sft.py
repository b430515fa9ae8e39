"""Supervised warm start: next-token loss on reference answers, before any reinforcement learning."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gspo import checkpoint
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.errors import Diverged
from gspo.models import load_model, load_tokenizer, pick_device, use_threads
from gspo.optim import make_optimizer, make_scheduler
from gspo.progress import Progress
from gspo.scoring import greedy_reward
from gspo.update import autocast, params_norm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
_PROBE_SIZE, _PROBE_EVERY = 256, 10  # examples held back for stop_reward (at most a quarter), steps between scores


def target_text(example: Example) -> str:
    """What the model should write: the canonical solution for code, else the reference itself."""
    ref = example.reference
    if isinstance(ref, dict) and "canonical_solution" in ref:
        return ref["canonical_solution"]
    return str(ref)


def warm_start(
    cfg: Config,
    model_dir: str | Path,
    examples: list[Example],
    out_dir: str | Path,
    on_step: Callable[[dict], None] | None = None,
) -> Path:
    """Fine-tune on (prompt, reference + EOS) pairs for cfg.warm_start.steps steps; save to out_dir.

    With warm_start.stop_reward set, a slice of the examples is kept out of training, and the warm start stops
    as soon as the greedy reward on that slice reaches it.
    """
    w = cfg.warm_start
    use_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, cfg.model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = warm_start_optimizer(params, cfg)
    probe = []
    n = min(_PROBE_SIZE, len(examples) // 4) if w.stop_reward else 0
    if n:
        # Scored on examples it does not train on: the reward on its own demonstrations would also count
        # what it has memorised, and the point is to hand GSPO a model that generalises.
        examples, probe = examples[:-n], examples[-n:]
    # Tokenised once: on a tiny model, tokenising every batch costs a quarter of the step.
    rows = [
        _tokens(
            tok,
            format_prompt(tok, e, cfg.data.use_chat_template),
            target_text(e) + tok.eos_token,
            cfg.gspo.max_prompt_length + cfg.gspo.max_new_tokens,
        )
        for e in examples
    ]
    log.info("warm start: up to %d steps on %d examples, %d held back for stop_reward", w.steps, len(rows), n)
    step, reward, why = 0, None, ""
    bar = Progress(w.steps, "warm start", log, enabled=cfg.train.progress)
    for step in range(1, w.steps + 1):
        ids, labels = _pad(tok, rng.sample(rows, min(w.batch_size, len(rows))))
        ids, labels = ids.to(device), labels.to(device)
        attn = (ids != tok.pad_token_id).long() | (labels != -100).long()
        with autocast(device):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        m = {"step": step, "sft_loss": loss.item()}
        if probe and step % _PROBE_EVERY == 0:
            # A small model crosses from guessing to computing at a step that varies a lot with the seed;
            # stopping on its score makes GSPO start from about the same skill, whatever the seed.
            reward = m["sft_reward"] = greedy_reward(model, tok, probe, cfg)
        if on_step is not None:
            on_step(m)
        bar.update(step, loss=f"{m['sft_loss']:.3f}", **({} if reward is None else {"reward": f"{reward:.3f}"}))
        if reward is not None and reward >= w.stop_reward:
            why = f"held-back reward {reward:.3f} reached warm_start.stop_reward {w.stop_reward}"
            break
    bar.close(why)
    norm = params_norm(params)
    if not math.isfinite(norm):
        raise Diverged(f"warm start: the weights are not finite after step {step}; lower warm_start.lr")
    return checkpoint.save_weights(
        model, tok, Path(out_dir), {"warm_start_steps": step, "warm_start_reward": reward, "stopped": why or None}
    )


def warm_start_optimizer(
    params: list[torch.nn.Parameter], cfg: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The training optimizer (with its bf16 rounding) at the warm start's rate, cosine to zero, no weight decay."""
    ocfg = dataclasses.replace(cfg.optim, lr=cfg.warm_start.lr, weight_decay=0.0, warmup_steps=0, min_lr_ratio=0.0)
    opt = make_optimizer(params, ocfg, seed=cfg.train.seed)
    return opt, make_scheduler(opt, ocfg, cfg.warm_start.steps)


def _tokens(tok: PreTrainedTokenizerBase, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Prompt+answer ids and labels on the answer only (-100 elsewhere), left-cut to max_len."""
    p = tok(prompt, add_special_tokens=False).input_ids
    a = tok(answer, add_special_tokens=False).input_ids
    return (p + a)[-max_len:], ([-100] * len(p) + a)[-max_len:]


def _pad(tok: PreTrainedTokenizerBase, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels) tensors of a batch of rows."""
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for r, (i, lab) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
    return ids, labels
