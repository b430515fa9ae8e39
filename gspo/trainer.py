"""The GSPO loop: rollout -> reward -> group advantages -> several clipped minibatch updates; checkpoints; resume."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import rewards
from gspo import checkpoint, distributed
from gspo.advantages import group_advantages
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.loss import policy_loss
from gspo.models import load_model, load_tokenizer, make_optimizer, make_scheduler
from gspo.rollout import Rollout, generate, token_logprobs


@dataclass
class TrainResult:
    final_dir: Path  # loadable with transformers' from_pretrained
    best_dir: Path | None  # best held-out reward, when evaluation ran
    metrics_path: Path  # one JSON object per step
    steps: int
    skipped_updates: int
    stopped_early: bool  # too many consecutive non-finite updates
    best_eval: float | None


@dataclass
class TrainState:
    """Everything beyond model and optimizer that an exact resume needs."""
    step: int = 0
    epoch: int = 0
    position: int = 0  # index into this epoch's prompt order
    skipped_updates: int = 0
    consecutive_skips: int = 0
    best_eval: float | None = None
    eval_history: list = field(default_factory=list)


class PromptSampler:
    """Seeded epoch-wise shuffles; (epoch, position) is the whole state, so resume continues the same order."""

    def __init__(self, n: int, seed: int, state: TrainState):
        self.n, self.seed, self.state = n, seed, state

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = np.random.default_rng([self.seed, self.state.epoch]).permutation(self.n)
            take = min(k - len(out), self.n - self.state.position)
            out += order[self.state.position:self.state.position + take].tolist()
            self.state.position += take
            if self.state.position == self.n:
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
        return out


def _micro_batches(idx: torch.Tensor, roll: Rollout, budget: int) -> list[torch.Tensor]:
    """Split a minibatch so each forward/backward holds about `budget` tokens (padded width x rows)."""
    width = roll.prompt_ids.shape[1] + int(roll.completion_mask[idx].sum(1).max())
    rows = max(1, budget // max(1, width))
    return [idx[i:i + rows] for i in range(0, len(idx), rows)]


def _trimmed(roll: Rollout, idx: torch.Tensor):
    """The rows of a micro-batch with all-padding prompt and completion columns cut off."""
    pm, cm = roll.prompt_mask[idx], roll.completion_mask[idx]
    p0 = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else pm.shape[1] - 1
    t1 = max(1, int(cm.sum(1).max()))
    return roll.prompt_ids[idx, p0:], pm[:, p0:], roll.completion_ids[idx, :t1], cm[:, :t1]


def _logprobs(model, roll: Rollout, idx: torch.Tensor, temperature: float, budget: int, with_entropy=False):
    """Log-probs (len(idx), T) for a set of rows, micro-batched, padded back to the rollout's width T."""
    T = roll.completion_ids.shape[1]
    lps, ents = [], []
    for mb in _micro_batches(idx, roll, budget):
        lp, ent = token_logprobs(model, *_trimmed(roll, mb), temperature=temperature, with_entropy=with_entropy)
        lps.append(torch.nn.functional.pad(lp, (0, T - lp.shape[1])))
        if with_entropy:
            ents.append(torch.nn.functional.pad(ent, (0, T - ent.shape[1])))
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _score(roll_texts: list[str], examples: list[Example]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Rewards (B,) and the rewards grouped per task for metrics."""
    scores = [0.0] * len(examples)
    per_task: dict[str, list[float]] = {}
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    for task, rows in by_task.items():
        results = rewards.score_batch(task, [roll_texts[i] for i in rows], [examples[i] for i in rows],
                                      workers=4 if task == "humaneval" else 1)
        for i, r in zip(rows, results):
            scores[i] = float(r.score)
        per_task[task] = [scores[i] for i in rows]
    return torch.tensor(scores, dtype=torch.float32), per_task


@torch.no_grad()
def evaluate_greedy(model, tok, examples: list[Example], cfg: Config, batch_size: int = 64) -> float:
    """Mean reward of greedy completions: the held-out score used to keep the best checkpoint."""
    if not examples:
        return float("nan")
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [format_prompt(tok, e, cfg.data.use_chat_template) for e in chunk]
        roll = generate(model, tok, prompts, 1, cfg.gspo.max_new_tokens, do_sample=False,
                        max_prompt_length=cfg.gspo.max_prompt_length)
        total += float(_score(roll.texts, chunk)[0].sum())
    return total / len(examples)


def train(cfg: Config, model_dir: str | Path, train_examples: list[Example], eval_examples: list[Example],
          out_dir: str | Path, on_step: Callable[[dict], None] | None = None,
          after_backward: Callable[[torch.nn.Module, int], None] | None = None) -> TrainResult:
    """Run (or resume) GSPO training; every step's metrics go to out_dir/metrics.jsonl and to `on_step`.

    Under torch.distributed (launched with torchrun) every rank takes a contiguous share of each step's prompts,
    whole groups, and gradients are summed across ranks before each update, so the run follows the same
    trajectory as one process (sampling noise is per completion, not per batch). Rank 0 writes metrics and
    checkpoints. `after_backward(model, update_index)` runs after each accumulated backward pass, before the
    non-finite guard: a place for gradient surgery or fault injection.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train_examples:
        raise ValueError("no training examples")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    g, o, t = cfg.gspo, cfg.optim, cfg.train
    eps_low, eps_high = g.clip_range()
    rank, world = distributed.rank_and_world()
    if g.prompts_per_step % world:
        raise ValueError(f"gspo.prompts_per_step={g.prompts_per_step} must be divisible by the {world} ranks")
    device = distributed.device(t.device)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    tok = load_tokenizer(model_dir)
    state = TrainState()
    resume_from = checkpoint.latest(out_dir)
    model = load_model(model_dir, cfg.model, device)
    ref = load_model(model_dir, cfg.model, device, trainable=False) if g.beta > 0 and cfg.model.lora_r == 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, o)
    sched = make_scheduler(opt, o, t.steps * g.num_minibatches)
    metrics_path = out_dir / "metrics.jsonl"
    if resume_from is not None:
        saved = checkpoint.load(resume_from, model, opt, sched)
        state = TrainState(**saved["state"])
        _set_rng_state(saved["rng"])
        if rank == 0:
            checkpoint.truncate_metrics(metrics_path, state.step)
    elif metrics_path.exists() and rank == 0:
        metrics_path.unlink()  # a fresh run: stale metrics from a run that never checkpointed

    # In fp32 without autocast the decoder's log-probs equal a fresh forward pass's to ~1e-6, far inside the
    # 3e-4 clip, so that forward is skipped; bf16 kernels differ more between the two, so there it is recomputed.
    sampler_logp_exact = device.type == "cpu" and all(p.dtype == torch.float32 for p in params)
    sampler = PromptSampler(len(train_examples), t.seed, state)
    prompts_text = [format_prompt(tok, e, cfg.data.use_chat_template) for e in train_examples]
    eval_subset = eval_examples[:cfg.data.eval_size] if cfg.data.eval_size else eval_examples
    P_local = g.prompts_per_step // world
    B, B_local = g.prompts_per_step * g.group_size, P_local * g.group_size
    lo = rank * B_local  # this rank's rows are global rows lo .. lo + B_local - 1
    stopped_early = False
    bar = None
    if t.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=state.step, desc="gspo", unit="step", dynamic_ncols=True)

    while state.step < t.steps:
        t0 = time.perf_counter()
        ids = sampler.take(g.prompts_per_step)[rank * P_local:(rank + 1) * P_local]
        examples = [train_examples[i] for i in ids for _ in range(g.group_size)]
        # One seed per completion, from (seed, step, global row): the same draw whatever the sharding.
        seeds = (t.seed * 1_000_003 + state.step) * B + lo + torch.arange(B_local, dtype=torch.int64)
        roll = generate(model, tok, [prompts_text[i] for i in ids], g.group_size, g.max_new_tokens,
                        g.temperature, g.top_p, g.max_prompt_length, row_seeds=seeds, decode=g.decode)
        t1 = time.perf_counter()
        reward, per_task = _score(roll.texts, examples)
        adv, zero_groups = group_advantages(reward, g.group_size)
        adv = adv.to(device)
        t2 = time.perf_counter()

        local_rows = torch.arange(B_local)
        model.eval()  # old log-probs without dropout, as the policy that sampled
        with torch.no_grad(), _autocast(device):
            if sampler_logp_exact:
                old_logp, entropy = roll.logp, roll.entropy
            else:
                old_logp, entropy = _logprobs(model, roll, local_rows, g.temperature, o.micro_batch_tokens, with_entropy=True)
            ref_logp = None
            if g.beta > 0:
                ref_model = ref if ref is not None else model
                with (model.disable_adapter() if ref is None else nullcontext()):
                    ref_logp, _ = _logprobs(ref_model, roll, local_rows, g.temperature, o.micro_batch_tokens)
        model.train()

        mask = roll.completion_mask.float()
        # Shuffle the global batch before splitting so each minibatch mixes groups; seeded by the step for resume.
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(t.seed * 1_000_003 + state.step))
        mb_metrics = []
        for mb_i, mb in enumerate(perm.chunk(g.num_minibatches)):
            mine = mb[(mb >= lo) & (mb < lo + B_local)] - lo
            if g.beta == 0:
                # A zero advantage (a group whose rewards are all equal) makes a row's loss and gradient exactly
                # zero, so its forward and backward are skipped; ratio and clip metrics cover trained rows only.
                mine = mine[adv[mine].cpu() != 0]
            opt.zero_grad(set_to_none=True)
            finite = True
            parts = []
            for micro in (_micro_batches(mine, roll, o.micro_batch_tokens) if len(mine) else []):
                pids, pm, cids, cm = _trimmed(roll, micro)
                Tm = cids.shape[1]
                with _autocast(device):
                    logp, _ = token_logprobs(model, pids, pm, cids, cm, temperature=g.temperature)
                out = policy_loss(logp, old_logp[micro, :Tm], adv[micro], mask[micro, :Tm], level=g.importance_sampling_level,
                                  eps_low=eps_low, eps_high=eps_high,
                                  ref_logp=None if ref_logp is None else ref_logp[micro, :Tm], beta=g.beta)
                if not torch.isfinite(out.loss):
                    finite = False
                    break
                # Weighted by rows of the global minibatch: summing over micro-batches and ranks gives its mean.
                (out.loss * (len(micro) / len(mb))).backward()
                parts.append((len(micro), out.metrics))
            update_index = state.step * g.num_minibatches + mb_i
            if after_backward is not None and finite:
                after_backward(model, update_index)
            for p in params:
                # No rows here (or on this rank): a zero gradient still moves AdamW's moments, as computing them
                # would, and every rank joins the gradient all-reduce with a tensor.
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            finite = distributed.all_finite(finite, device)
            grad_norm = float("nan")
            if finite:
                distributed.sum_gradients(params)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf")))
                finite = math.isfinite(grad_norm)
            if finite:
                opt.step()
                state.consecutive_skips = 0
            else:
                opt.zero_grad(set_to_none=True)
                state.skipped_updates += 1
                state.consecutive_skips += 1
            sched.step()
            mb_metrics.append(distributed.reduce_loss_metrics(parts, device) | {"grad_norm": grad_norm, "skipped": 0.0 if finite else 1.0})
            if state.consecutive_skips >= t.max_consecutive_skips:
                stopped_early = True
                break
        t3 = time.perf_counter()

        state.step += 1
        # Per-row signals of the whole global batch, for metrics identical to a single-process run.
        lens = roll.completion_mask.sum(1).float()
        ent_sum, ent_n = float((entropy * mask).sum()), float(mask.sum())
        reward, adv, lens, trunc = (distributed.gather(x, device) for x in (reward, adv, lens, roll.truncated.float()))
        per_task = distributed.gather_lists(per_task)
        ent_sum, ent_n, zero_groups, n_tokens = distributed.sum_floats(
            [ent_sum, ent_n, zero_groups, float(roll.prompt_mask.sum() + roll.completion_mask.sum())], device)
        ok = [m for m in mb_metrics if not m["skipped"]]
        m = {
            "step": state.step,
            "reward_mean": float(reward.mean()), "reward_std": float(reward.std(unbiased=False)),
            **{f"reward/{k}": float(np.mean(v)) for k, v in per_task.items()},
            "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std(unbiased=False)),
            "advantage_abs_max": float(adv.abs().max()),
            "zero_std_group_frac": zero_groups / g.prompts_per_step,
            **_mean_over(ok, ["ratio_mean", "clip_frac", "clip_frac_low", "clip_frac_high", "loss", "kl"]),
            "ratio_min": min((m["ratio_min"] for m in ok if "ratio_min" in m), default=float("nan")),
            "ratio_max": max((m["ratio_max"] for m in ok if "ratio_max" in m), default=float("nan")),
            "entropy": ent_sum / max(ent_n, 1.0),
            "completion_len_mean": float(lens.mean()), "completion_len_max": float(lens.max()),
            "truncated_frac": float(trunc.mean()),
            "grad_norm": float(np.mean([x["grad_norm"] for x in ok])) if ok else float("nan"),
            "lr": sched.get_last_lr()[0],
            "skipped_updates": state.skipped_updates,
            "tokens_per_s": n_tokens * (1 + len(mb_metrics)) / (t3 - t0),
            "rollout_tokens_per_s": float(lens.sum()) / (t1 - t0),
            "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_update_s": t3 - t2,
        }
        if rank == 0:
            if t.eval_every and (state.step % t.eval_every == 0 or state.step == t.steps) and eval_subset:
                score = evaluate_greedy(model, tok, eval_subset, cfg)
                m["eval_reward"] = score
                state.eval_history.append([state.step, score])
                if state.best_eval is None or score > state.best_eval:
                    state.best_eval = score
                    checkpoint.save_weights(model, tok, out_dir / "best", {"step": state.step, "eval_reward": score})
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if on_step is not None:
                on_step(m)
            if bar is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", clip=f"{m.get('clip_frac', 0):.3f}")
                bar.update(1)
            if stopped_early or (t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < t.steps):
                checkpoint.save(out_dir, state.step, model, tok, opt, sched, state.__dict__, _rng_state(), t.keep_checkpoints)
        distributed.barrier()
        if stopped_early:
            break
    if bar is not None:
        bar.close()
    if rank == 0:
        checkpoint.save_weights(model, tok, out_dir / "final", {"step": state.step, "stopped_early": stopped_early})
    distributed.barrier()
    best = out_dir / "best"
    return TrainResult(out_dir / "final", best if best.exists() else None, metrics_path, state.step,
                       state.skipped_updates, stopped_early, state.best_eval)


def _mean_over(ms: list[dict], keys: list[str]) -> dict:
    """Mean of each key over the dicts that have it (a minibatch with no trained rows has no loss metrics)."""
    return {k: float(np.mean([m[k] for m in ms if k in m])) for k in keys if any(k in m for m in ms)}


def _autocast(device: torch.device):
    # bf16 autocast only on CUDA: on CPU it is slow and the weights are fp32 anyway.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
