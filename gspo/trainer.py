"""The GSPO loop, one step in labelled phases: rollout -> reward -> group advantages -> plan -> old log-probs
-> several clipped minibatch updates (gspo.update) -> metrics (gspo.metrics) -> evaluation and checkpoints.
Resumes exactly from its last checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from gspo import checkpoint, distributed, metrics, scoring, update
from gspo.advantages import group_advantages
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.errors import Diverged, Stopped
from gspo.io import atomic_file
from gspo.models import load_model, load_tokenizer, use_threads
from gspo.optim import make_optimizer, make_scheduler
from gspo.progress import Progress
from gspo.rollout import Rollout, generate

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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
        out: list[int] = []
        while len(out) < k:
            order = np.random.default_rng([self.seed, self.state.epoch]).permutation(self.n)
            take = min(k - len(out), self.n - self.state.position)
            out += order[self.state.position : self.state.position + take].tolist()
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


def sampler_logprobs_are_exact(model: PreTrainedModel, device: torch.device) -> bool:
    """Whether the decoder's own log-probs may stand in for a fresh forward's as the old log-probs.

    In fp32 on the CPU, without autocast, the KV-cache decoder's log-probs equal a full forward's to about 1e-6
    per token (tests/test_rollout.py), far inside the 3e-4 clip, so that forward is skipped. Any lower-precision
    weight or buffer, or another device, makes the two differ by more: there they are recomputed."""
    return device.type == "cpu" and all(
        t.dtype == torch.float32 for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    )


def rollout(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: Config,
    step: int,
    first_row: int,
    n_rows: int,
) -> Rollout:
    """group_size sampled completions per prompt; this rank's rows start at global row first_row of n_rows."""
    g = cfg.gspo
    seeds = update.row_seeds(cfg.train.seed, step, n_rows, first_row, len(prompts) * g.group_size)
    return generate(
        model,
        tok,
        prompts,
        g.group_size,
        g.max_new_tokens,
        g.temperature,
        g.top_p,
        g.max_prompt_length,
        row_seeds=seeds,
        decode=g.decode,
    )


# Fields that may differ between a run and its resumption: they change neither the weights nor the data order.
RESUMABLE_CHANGES = {"train": {"progress", "threads", "device", "checkpoint_every", "keep_checkpoints", "sharding"}}
RUN_RECORD = "run.json"


def resume_sections(cfg: Config) -> dict:
    """The config a run's result depends on: what must be equal for one run to continue another."""
    d = cfg.to_dict()
    out = {
        k: {f: v for f, v in d[k].items() if f not in RESUMABLE_CHANGES.get(k, set())}
        for k in ("model", "data", "warm_start", "gspo", "optim", "train")
    }
    out["eval"] = {"code_timeout": d["eval"]["code_timeout"]}  # it decides code rewards
    return out


def differences(old: dict, new: dict) -> list[str]:
    """`section.field: old -> new` for every field of two resume_sections() that differs."""
    return [
        f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}"
        for sec, fields in new.items()
        for k, v in fields.items()
        if old.get(sec, {}).get(k) != v
    ]


def run_record(cfg: Config, model_dir: Path, train_examples: list[Example]) -> dict:
    """What a run trains: the config sections training reads and fingerprints of its model and data."""
    data = b"".join(json.dumps(e.to_dict(), sort_keys=True).encode() + b"\n" for e in train_examples)
    files = sorted((str(f.relative_to(model_dir)), f.stat().st_size) for f in Path(model_dir).rglob("*") if f.is_file())
    return {
        "config": resume_sections(cfg),
        "train_data_sha256": hashlib.sha256(data).hexdigest(),
        "model_files": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
    }


def check_same_run(out_dir: Path, record: dict) -> None:
    """Refuse to continue a run of another configuration in out_dir: a one-line error naming what differs."""
    path = out_dir / RUN_RECORD
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = differences(old["config"], record["config"])
    diff += [f"{k} changed" for k in ("train_data_sha256", "model_files") if old.get(k) != record[k]]
    if diff:
        raise ValueError(
            f"{out_dir} holds a run of another training configuration ({'; '.join(diff[:6])}"
            f"{'; ...' if len(diff) > 6 else ''}); train into a new directory"
        )


@contextmanager
def stop_requests():
    """SIGTERM and SIGINT, where no other handler of SIGTERM is in place, ask training to stop at its next safe point
    (after the rollout, or after the step's updates) with a checkpoint; a second signal ends the process at once.
    The flag is a one-item list. Off the main thread signals cannot be caught, and the runner's own handling
    applies."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    # A process whose SIGTERM someone else handles (an orchestrator: Prefect tells a cancel from a crash by its own
    # handler being in place) is stopped by that one, for both signals; the stage resumes from its last periodic
    # checkpoint.
    free = (signal.SIG_DFL, signal.default_int_handler)
    owned = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    taken = [] if owned else [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) in free]

    def handler(signum, frame):
        if flag:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        flag.append(signum)
        log.warning(
            "%s received: stopping at the end of this step's updates with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    old = {s: signal.signal(s, handler) for s in taken}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Run:
    """One training run's live objects, built once: model (and reference), optimizer, schedule, loop state."""

    def __init__(
        self, cfg: Config, model_dir: Path, train_examples: list[Example], eval_examples: list[Example], out_dir: Path
    ):
        g, t = cfg.gspo, cfg.train
        self.cfg, self.out_dir = cfg, out_dir
        self.rank, self.world = distributed.rank_and_world()
        if g.prompts_per_step % self.world:
            raise ValueError(f"gspo.prompts_per_step={g.prompts_per_step} must be divisible by the {self.world} ranks")
        self.device = distributed.device(t.device)
        self.sharded = t.sharding == "fsdp" and self.world > 1  # one process has nothing to shard
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.tok = load_tokenizer(model_dir)
        self.model = load_model(model_dir, cfg.model, self.device)
        self.ref = (
            load_model(model_dir, cfg.model, self.device, trainable=False)
            if g.beta > 0 and cfg.model.lora_r == 0
            else None
        )
        if self.sharded:
            for m in (self.model, self.ref):
                if m is not None:
                    distributed.shard(m, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        stepped = distributed.optimizer_params(self.params)
        self.opt = make_optimizer(stepped, cfg.optim, seed=t.seed)
        if stepped is not self.params:
            self.opt.register_step_pre_hook(lambda *_: distributed.attach(self.params, stepped))
        self.sched = make_scheduler(self.opt, cfg.optim, t.steps * g.num_minibatches)
        self.state = TrainState()
        self.metrics_path = out_dir / "metrics.jsonl"
        self.examples = train_examples
        self.prompts = [format_prompt(self.tok, e, cfg.data.use_chat_template) for e in train_examples]
        self.eval_examples = eval_examples[: cfg.data.eval_size] if cfg.data.eval_size else eval_examples
        self.sampler = PromptSampler(len(train_examples), t.seed, self.state)
        self.exact_sampler = sampler_logprobs_are_exact(self.model, self.device)
        self.n_rows = g.prompts_per_step * g.group_size
        self.first_row = self.rank * self.n_rows // self.world  # this rank's rows: first_row .. + n_rows / world - 1
        self.norm = update.params_norm(self.params)
        self.stopped_early = False  # train.max_consecutive_skips non-finite updates in a row
        self.last_checkpoint: Path | None = None

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (rank 0 picks it, setting corrupt ones aside)."""
        ckpt = checkpoint.latest_intact(self.out_dir) if self.rank == 0 else None
        ckpt = distributed.broadcast_object(ckpt)
        if ckpt is None:
            if self.rank == 0 and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run: stale metrics from a run that never checkpointed
            return
        saved = checkpoint.load(ckpt, self.model, self.opt, self.sched)
        self.state.__dict__.update(saved["state"])
        _set_rng_state(saved["rng"])
        self.norm = update.params_norm(self.params)
        if self.rank == 0:
            checkpoint.truncate_metrics(self.metrics_path, self.state.step)
            log.info("resumed from %s (step %d)", ckpt, self.state.step)

    def step(
        self, stop: list[int], after_backward: Callable[[torch.nn.Module, int], None] | None = None
    ) -> dict | None:
        """One rollout batch, in phases; None when a stop was requested before its updates (nothing changed)."""
        cfg, g = self.cfg, self.cfg.gspo
        t0 = time.perf_counter()
        before = (self.state.epoch, self.state.position, _rng_state())
        # 1. rollout: this rank's share of the step's prompts, whole groups
        share = g.prompts_per_step // self.world
        ids = self.sampler.take(g.prompts_per_step)[self.rank * share : (self.rank + 1) * share]
        examples = [self.examples[i] for i in ids for _ in range(g.group_size)]
        roll = rollout(
            self.model, self.tok, [self.prompts[i] for i in ids], cfg, self.state.step, self.first_row, self.n_rows
        )
        assert roll.logp is not None and roll.entropy is not None  # sampled, so the decoder reported both
        t1 = time.perf_counter()
        # 2. rewards and group advantages
        reward, per_task = scoring.score(roll.texts, examples, cfg)
        adv, zero_groups = group_advantages(reward, g.group_size)
        adv = adv.to(self.device)
        t2 = time.perf_counter()
        if distributed.any_flag(bool(stop), self.device):
            # Abandon the step: nothing was updated, so the state before it is exactly resumable.
            self.state.epoch, self.state.position = before[:2]
            self._checkpoint(rng=before[2])
            return None
        # 3. which rows each update trains, and their old (and reference) log-probs in the same micro-batches
        plan = update.make_plan(roll, adv, cfg, self.state.step, self.first_row, self.n_rows)
        old_logp = roll.logp if self.exact_sampler else update.logprobs(self.model, roll, plan, g.temperature)
        ref_logp = None
        if g.beta > 0:
            with cast("PeftModel", self.model).disable_adapter() if self.ref is None else nullcontext():
                ref_logp = update.logprobs(self.ref or self.model, roll, plan, g.temperature)
        # 4. num_minibatches clipped updates
        res = update.run_updates(
            self.model,
            self.opt,
            self.sched,
            self.params,
            roll,
            adv,
            old_logp,
            ref_logp,
            plan,
            cfg,
            self.state.consecutive_skips,
            self.norm,
            after_backward,
            self.state.step * g.num_minibatches,
        )
        if res.grad_norms:
            self.norm = res.norm
        self.stopped_early = res.stopped
        t3 = time.perf_counter()
        self.state.step += 1
        for ok in res.finite:
            self.state.skipped_updates += not ok
            self.state.consecutive_skips = 0 if ok else self.state.consecutive_skips + 1
        # 5. metrics of the whole global batch, identical to a single process's
        lens = roll.completion_mask.sum(1).float()
        mask = roll.completion_mask.float()
        trained = float(sum(len(mc) for mb in plan for mc in mb.micro))
        reward, adv, lens, trunc = (
            distributed.gather(x, self.device) for x in (reward, adv.cpu(), lens, roll.truncated.float())
        )
        per_task = distributed.gather_lists(per_task)
        ent_sum, ent_n, zero_groups_all, n_tokens, trained = distributed.sum_floats(
            [
                float((roll.entropy * mask).sum()),
                float(mask.sum()),
                zero_groups,
                float(roll.prompt_mask.sum() + roll.completion_mask.sum()),
                trained,
            ],
            self.device,
        )
        return {
            "step": self.state.step,
            **metrics.step_metrics(
                reward,
                per_task,
                adv,
                zero_groups_all / g.prompts_per_step,
                trained / self.n_rows,
                res,
                ent_sum / max(ent_n, 1.0),
                lens,
                trunc,
            ),
            "skipped_updates": self.state.skipped_updates,
            "tokens_per_s": n_tokens / (t3 - t0),
            "rollout_tokens_per_s": float(lens.sum()) / (t1 - t0),
            "time_rollout_s": t1 - t0,
            "time_reward_s": t2 - t1,
            "time_update_s": t3 - t2,
        }

    def finish_step(self, m: dict, on_step: Callable[[dict], None] | None, stop: list[int]) -> bool:
        """Evaluation, the metrics line, the checkpoint; True when training must end here."""
        t, st = self.cfg.train, self.state
        stopped = self.stopped_early
        requested = distributed.any_flag(bool(stop), self.device)
        due = t.eval_every and (st.step % t.eval_every == 0 or st.step == t.steps) and self.eval_examples
        # Sharded, every rank runs the same evaluation in step (each forward needs them all) and gets the same score.
        if due and (self.rank == 0 or self.sharded):
            score = scoring.greedy_reward(self.model, self.tok, self.eval_examples, self.cfg)
            m["eval_reward"] = score
            st.eval_history.append([st.step, score])
            if st.best_eval is None or score > st.best_eval:
                st.best_eval = score
                self.save_weights(self.out_dir / "best", {"step": st.step, "eval_reward": score})
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(checkpoint.metrics_line(m))
            if on_step is not None:
                on_step(m)
        if stopped or requested or (t.checkpoint_every and st.step % t.checkpoint_every == 0 and st.step < t.steps):
            self._checkpoint()
        return stopped or requested

    def save_weights(self, out: Path, meta: dict) -> None:
        """The model, loadable with from_pretrained, written by rank 0 (sharded: gathered from every rank first)."""
        weights = distributed.full_model_state(self.model) if self.sharded else None
        if self.rank == 0:
            checkpoint.save_weights(self.model, self.tok, out, meta, weights)

    def _checkpoint(self, rng: dict | None = None) -> None:
        weights = opt_state = None
        if self.sharded:
            weights = distributed.full_model_state(self.model)
            opt_state = distributed.full_optimizer_state(self.opt, self.params)
        if self.rank == 0:
            self.last_checkpoint = checkpoint.save(
                self.out_dir,
                self.state.step,
                self.model,
                self.tok,
                self.opt,
                self.sched,
                self.state.__dict__,
                rng or _rng_state(),
                self.cfg.train.keep_checkpoints,
                weights,
                opt_state,
            )
        distributed.barrier()


def train(
    cfg: Config,
    model_dir: str | Path,
    train_examples: list[Example],
    eval_examples: list[Example],
    out_dir: str | Path,
    on_step: Callable[[dict], None] | None = None,
    after_backward: Callable[[torch.nn.Module, int], None] | None = None,
) -> TrainResult:
    """Run (or resume) GSPO training; every step's metrics go to out_dir/metrics.jsonl and to `on_step`.

    Under torch.distributed (launched with torchrun) every rank takes a contiguous share of each step's prompts,
    whole groups, and gradients are summed across ranks before each update, so the run follows the same
    trajectory as one process (sampling noise is per completion, not per batch). With train.sharding fsdp the
    ranks also split the weights, gradients and optimizer states (gspo.distributed). Rank 0 writes metrics and
    checkpoints, in the same files whatever the sharding. `after_backward(model, update_index)` runs after each
    accumulated backward pass, before the non-finite guard: a place for gradient surgery or fault injection.

    Raises ValueError when out_dir holds a run of another configuration or another process trains there,
    Stopped after a SIGTERM / SIGINT (with a checkpoint), and update.Diverged when the weights blow up (nothing
    after the last checkpoint is saved).
    """
    out_dir = Path(out_dir)
    if not train_examples:
        raise ValueError("no training examples")
    use_threads(cfg.train.threads)
    rank = distributed.rank_and_world()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.RunLock(out_dir) if rank == 0 else nullcontext(), stop_requests() as stop:
        record = run_record(cfg, Path(model_dir), train_examples)
        if rank == 0:
            check_same_run(out_dir, record)
            checkpoint.remove_unfinished(out_dir)
        distributed.barrier()
        run = Run(cfg, Path(model_dir), train_examples, eval_examples, out_dir)
        run.resume()
        if rank == 0:
            with atomic_file(out_dir / RUN_RECORD) as f:
                json.dump(record, f, indent=1, sort_keys=True)
        bar = Progress(cfg.train.steps, "gspo", log, run.state.step, enabled=cfg.train.progress and rank == 0)
        while run.state.step < cfg.train.steps:
            try:
                m = run.step(stop, after_backward)
            except Diverged as e:
                last = checkpoint.latest_intact(out_dir) if rank == 0 else None
                raise Diverged(f"{e}; the last good checkpoint is {last or 'none: nothing was saved'}") from None
            if m is None or (run.finish_step(m, on_step, stop) and not run.stopped_early):
                # Another rank may have been signalled first: every rank stops together.
                raise Stopped(stop[0] if stop else signal.SIGTERM, run.state.step, run.last_checkpoint)
            bar.update(run.state.step, reward=f"{m['reward_mean']:.3f}", clip=f"{m.get('clip_frac') or 0:.3f}")
            if run.stopped_early:
                break
        bar.close(f"{cfg.train.max_consecutive_skips} non-finite updates in a row" if run.stopped_early else "")
        run.save_weights(out_dir / "final", {"step": run.state.step, "stopped_early": run.stopped_early})
        distributed.barrier()
    best = out_dir / "best"
    return TrainResult(
        out_dir / "final",
        best if best.exists() else None,
        run.metrics_path,
        run.state.step,
        run.state.skipped_updates,
        run.stopped_early,
        run.state.best_eval,
    )
