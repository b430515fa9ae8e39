"""The GSPO loop, one step in labelled phases: rollout -> reward -> group advantages -> plan -> old log-probs
-> several clipped minibatch updates (gspo.update) -> metrics (gspo.metrics) -> evaluation and checkpoints.
Resumes exactly from its last checkpoint."""
from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gspo import checkpoint, distributed, metrics, scoring, update
from gspo.advantages import group_advantages
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.models import load_model, load_tokenizer, use_threads
from gspo.optim import make_optimizer, make_scheduler
from gspo.rollout import Rollout, generate


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


def sampler_logprobs_are_exact(model, device: torch.device) -> bool:
    """Whether the decoder's own log-probs may stand in for a fresh forward's as the old log-probs.

    In fp32 on the CPU, without autocast, the KV-cache decoder's log-probs equal a full forward's to about 1e-6
    per token (tests/test_rollout.py), far inside the 3e-4 clip, so that forward is skipped. Any lower-precision
    weight or buffer, or another device, makes the two differ by more: there they are recomputed."""
    return device.type == "cpu" and all(t.dtype == torch.float32 for t in
                                        [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())])


def rollout(model, tok, prompts: list[str], cfg: Config, step: int, first_row: int, n_rows: int) -> Rollout:
    """group_size sampled completions per prompt; this rank's rows start at global row first_row of n_rows."""
    g = cfg.gspo
    seeds = update.row_seeds(cfg.train.seed, step, n_rows, first_row, len(prompts) * g.group_size)
    return generate(model, tok, prompts, g.group_size, g.max_new_tokens, g.temperature, g.top_p, g.max_prompt_length,
                    row_seeds=seeds, decode=g.decode)


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
    g, t = cfg.gspo, cfg.train
    use_threads(t.threads)
    rank, world = distributed.rank_and_world()
    if g.prompts_per_step % world:
        raise ValueError(f"gspo.prompts_per_step={g.prompts_per_step} must be divisible by the {world} ranks")
    device = distributed.device(t.device)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, cfg.model, device)
    ref = load_model(model_dir, cfg.model, device, trainable=False) if g.beta > 0 and cfg.model.lora_r == 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optim, seed=t.seed)
    sched = make_scheduler(opt, cfg.optim, t.steps * g.num_minibatches)
    state = TrainState()
    metrics_path = out_dir / "metrics.jsonl"
    resume_from = checkpoint.latest(out_dir)
    if resume_from is not None:
        saved = checkpoint.load(resume_from, model, opt, sched)
        state = TrainState(**saved["state"])
        _set_rng_state(saved["rng"])
        if rank == 0:
            checkpoint.truncate_metrics(metrics_path, state.step)
    elif metrics_path.exists() and rank == 0:
        metrics_path.unlink()  # a fresh run: stale metrics from a run that never checkpointed

    exact_sampler = sampler_logprobs_are_exact(model, device)
    sampler = PromptSampler(len(train_examples), t.seed, state)
    prompts_text = [format_prompt(tok, e, cfg.data.use_chat_template) for e in train_examples]
    eval_subset = eval_examples[:cfg.data.eval_size] if cfg.data.eval_size else eval_examples
    P_local = g.prompts_per_step // world
    B, B_local = g.prompts_per_step * g.group_size, P_local * g.group_size
    lo = rank * B_local  # this rank's rows are global rows lo .. lo + B_local - 1
    stopped_early = False
    norm = update.params_norm(params)
    bar = None
    if t.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=state.step, desc="gspo", unit="step", dynamic_ncols=True)

    while state.step < t.steps:
        t0 = time.perf_counter()
        # 1. rollout
        ids = sampler.take(g.prompts_per_step)[rank * P_local:(rank + 1) * P_local]
        examples = [train_examples[i] for i in ids for _ in range(g.group_size)]
        roll = rollout(model, tok, [prompts_text[i] for i in ids], cfg, state.step, lo, B)
        t1 = time.perf_counter()
        # 2. rewards and group advantages
        reward, per_task = scoring.score(roll.texts, examples, cfg)
        adv, zero_groups = group_advantages(reward, g.group_size)
        adv = adv.to(device)
        t2 = time.perf_counter()
        # 3. which rows each update trains, and their old (and reference) log-probs in the same micro-batches
        plan = update.make_plan(roll, adv, cfg, state.step, lo, B)
        old_logp = roll.logp if exact_sampler else update.logprobs(model, roll, plan, g.temperature)
        ref_logp = None
        if g.beta > 0:
            with (model.disable_adapter() if ref is None else nullcontext()):
                ref_logp = update.logprobs(ref if ref is not None else model, roll, plan, g.temperature)
        # 4. num_minibatches clipped updates
        res = update.run_updates(model, opt, sched, params, roll, adv, old_logp, ref_logp, plan, cfg,
                                 state.consecutive_skips, norm, after_backward, state.step * g.num_minibatches)
        norm = res.norm if res.grad_norms else norm
        t3 = time.perf_counter()

        state.step += 1
        for ok in res.finite:
            state.skipped_updates += not ok
            state.consecutive_skips = 0 if ok else state.consecutive_skips + 1
        stopped_early = res.stopped
        # 5. metrics of the whole global batch, identical to a single process's
        lens = roll.completion_mask.sum(1).float()
        mask = roll.completion_mask.float()
        trained = float(sum(len(mc) for mb in plan for mc in mb.micro))
        reward, adv_all, lens, trunc = (distributed.gather(x, device) for x in (reward, adv.cpu(), lens, roll.truncated.float()))
        per_task = distributed.gather_lists(per_task)
        ent_sum, ent_n, zero_groups, n_tokens, trained = distributed.sum_floats(
            [float((roll.entropy * mask).sum()), float(mask.sum()), zero_groups,
             float(roll.prompt_mask.sum() + roll.completion_mask.sum()), trained], device)
        m = {"step": state.step, **metrics.step_metrics(reward, per_task, adv_all, zero_groups / g.prompts_per_step,
                                                        trained / B, res, ent_sum / max(ent_n, 1.0), lens, trunc),
             "skipped_updates": state.skipped_updates,
             "tokens_per_s": n_tokens / (t3 - t0), "rollout_tokens_per_s": float(lens.sum()) / (t1 - t0),
             "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_update_s": t3 - t2}
        # 6. evaluation, metrics line, checkpoint
        if rank == 0:
            if t.eval_every and (state.step % t.eval_every == 0 or state.step == t.steps) and eval_subset:
                score = scoring.greedy_reward(model, tok, eval_subset, cfg)
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
