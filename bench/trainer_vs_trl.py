"""GSPO training speed: gspo.trainer.train against TRL's GRPOTrainer (importance_sampling_level="sequence").

Both train the same tiny model on the same arithmetic prompts with the same work per rollout step:
prompts_per_step * group_size completions of at most max_new_tokens sampled at the same temperature, the
exact-match arithmetic reward, then num_minibatches AdamW updates on equal slices of the shuffled batch. In TRL
that is per_device_train_batch_size = batch / num_minibatches, steps_per_generation = num_minibatches,
gradient_accumulation_steps = 1, num_iterations = 1: one generation every num_minibatches optimizer steps, old
log-probs computed once per generation (the steps are not aligned with generation, so TRL computes them).
Both use loss_type="grpo" normalisation, beta = 0, fp32 on CPU and the same number of torch threads.

First a loss-agreement check: on one fixed batch TRL's own compute_loss (its forward with the fused LM head)
and ours (token_logprobs + policy_loss) must give the same loss, log-probs and gradient. Then both train in
turns, one rollout step each (two threads, never running at once), so a shared machine's changing load hits
both alike; `--warmup` steps of each are dropped (imports, first allocations). The last line is
`ratio=<our steps/s over TRL's>`, from the median seconds per step of each.

Both start from the tiny model after `--warm-start` supervised steps, so groups have mixed rewards as in real
training. Ours skips the forward and backward of rows whose advantage is zero (groups with equal rewards; beta
is 0), which TRL computes; the fraction of such groups is printed with the timings.

    python bench/trainer_vs_trl.py [--steps N] [--warmup W] [--threads T] [--warm-start S] [--set section.field=value]
"""

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards
from gspo.advantages import group_advantages
from gspo.config import load_config
from gspo.data import format_prompt, prepare_splits
from gspo.loss import policy_loss
from gspo.models import load_tokenizer
from gspo.rollout import generate, token_logprobs
from gspo.sft import warm_start
from gspo.tiny import save_tiny
from gspo.trainer import train

# The comparison's fixed choices on top of the project defaults: torch's AdamW on both sides, so the optimizer
# is the same code; no held-out evaluation or checkpoints inside the timed loop.
BENCH = ["optim.optimizer=adamw", "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false"]


def bench_config(steps: int, threads: int, extra: list[str] = ()):
    return load_config(None, BENCH + [f"train.steps={steps}", f"train.threads={threads}", *extra])


def trl_args(cfg, out_dir: str, steps: int):
    """GRPOConfig doing the same work as `cfg`: one generation of the whole rollout batch, then
    num_minibatches optimizer steps of batch / num_minibatches completions each."""
    from trl import GRPOConfig

    g, o = cfg.gspo, cfg.optim
    batch = g.prompts_per_step * g.group_size
    if batch % g.num_minibatches:
        raise ValueError(
            f"gspo.num_minibatches={g.num_minibatches} must divide the batch of {batch} for TRL's equal slices"
        )
    eps_low, eps_high = g.clip_range()
    return GRPOConfig(
        output_dir=out_dir,
        report_to="none",
        save_strategy="no",
        push_to_hub=False,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        logging_steps=g.num_minibatches,
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        max_steps=steps * g.num_minibatches,
        per_device_train_batch_size=batch // g.num_minibatches,
        gradient_accumulation_steps=1,
        steps_per_generation=g.num_minibatches,
        num_iterations=1,
        num_generations=g.group_size,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=0,
        importance_sampling_level=g.importance_sampling_level,
        loss_type="grpo",
        beta=g.beta,
        epsilon=eps_low,
        epsilon_high=eps_high,
        scale_rewards="group",
        optim="adamw_torch",
        learning_rate=o.lr,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        weight_decay=o.weight_decay,
        max_grad_norm=o.grad_clip,
        warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        activation_checkpointing=False,  # GRPOConfig turns it on by default; ours is off by default
    )


def make_trl_trainer(cfg, model_dir: Path, examples, out_dir: str, steps: int, on_generation=None):
    """A GRPOTrainer on the formatted prompts; `on_generation(completion_tokens)` is called once per rollout."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    tok = load_tokenizer(model_dir)
    rows = [{"prompt": format_prompt(tok, e, cfg.data.use_chat_template), "example": i} for i, e in enumerate(examples)]

    def arithmetic(completions, example, completion_ids, **_):
        if on_generation is not None:
            on_generation(sum(len(c) for c in completion_ids))
        return [rewards.score(examples[i].task, c, examples[i]).score for c, i in zip(completions, example)]

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return GRPOTrainer(
        model=model,
        reward_funcs=arithmetic,
        args=trl_args(cfg, out_dir, steps),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )


class Turns:
    """Trainers in threads taking turns, one rollout step each, so on a shared machine all see the same load;
    each step's time runs from getting the turn to handing it over."""

    def __init__(self, names: list[str]):
        self.names, self.turn, self.finished = names, names[0], set()
        self.cond = threading.Condition()
        self.secs = {n: [] for n in names}
        self.started = {}

    def begin(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.started[name] = time.perf_counter()

    def step_done(self, name: str) -> None:
        self.secs[name].append(time.perf_counter() - self.started[name])
        self._hand_over(name)
        self.begin(name)

    def finish(self, name: str) -> None:
        with self.cond:
            self.finished.add(name)
        self._hand_over(name)

    def _hand_over(self, name: str) -> None:
        with self.cond:
            i = self.names.index(name)
            others = [n for n in self.names[i + 1 :] + self.names[:i] if n not in self.finished]
            self.turn = others[0] if others else name
            self.cond.notify_all()


ZERO_STD: list[float] = []  # per step of ours: the fraction of groups with equal rewards, whose rows it skips


def run_ours(cfg, model_dir: Path, splits, out_dir: str, at_step) -> list[int]:
    """Train; `at_step()` is called after every rollout step. Returns each step's completion tokens."""
    tokens = []

    def on_step(m):
        tokens.append(round(m["completion_len_mean"] * cfg.gspo.prompts_per_step * cfg.gspo.group_size))
        ZERO_STD.append(m["zero_std_group_frac"])
        at_step()

    res = train(cfg, model_dir, splits.train, splits.held_out, out_dir, on_step=on_step)
    assert res.steps == cfg.train.steps and res.skipped_updates == 0, res
    return tokens


def run_trl(cfg, model_dir: Path, splits, out_dir: str, at_step) -> list[int]:
    from transformers import PrinterCallback, TrainerCallback

    tokens = []
    per_rollout = cfg.gspo.num_minibatches

    class RolloutStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_rollout == 0:  # a rollout step ends with its last minibatch update
                at_step()

    torch.manual_seed(cfg.train.seed)
    trainer = make_trl_trainer(cfg, model_dir, splits.train, out_dir, cfg.train.steps, on_generation=tokens.append)
    trainer.remove_callback(PrinterCallback)  # its per-log print is console noise, not training work
    trainer.add_callback(RolloutStep())
    trainer.train()
    # Same work as ours: one generation per rollout step, num_minibatches optimizer updates each, same threads.
    assert len(tokens) == cfg.train.steps and trainer.state.global_step == cfg.train.steps * per_rollout
    assert torch.get_num_threads() == cfg.train.threads
    return tokens


def run_both(cfg, model_dir: Path, splits, work: Path) -> tuple[dict, dict]:
    """Both trainers, interleaved step by step; per trainer, every step's seconds and completion tokens."""
    runners = {"ours": run_ours, "trl": run_trl}
    turns = Turns(list(runners))
    tokens, errors = {}, []

    def worker(name):
        try:
            turns.begin(name)
            with tempfile.TemporaryDirectory(dir=work) as out:
                tokens[name] = runners[name](cfg, model_dir, splits, out, lambda: turns.step_done(name))
        except BaseException as e:  # re-raised below; the other trainer still gets its turns
            errors.append(e)
        finally:
            turns.finish(name)

    threads = [threading.Thread(target=worker, args=(name,)) for name in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return turns.secs, tokens


def check_loss(cfg, model_dir: Path, examples, n_prompts: int = 4, noise: float = 2e-3) -> dict:
    """TRL's compute_loss vs ours on one fixed batch: a real rollout of n_prompts groups, old log-probs
    perturbed so some sequence ratios leave the clip range, seeded 0/1 rewards for non-zero advantages.
    Returns the loss of each, the largest log-prob / gradient differences and the clipped fraction."""
    g = cfg.gspo
    eps_low, eps_high = g.clip_range()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trl_trainer(cfg, model_dir, examples, tmp, steps=1)
    model, tok = trainer.model, trainer.processing_class
    prompts = [format_prompt(tok, e, cfg.data.use_chat_template) for e in examples[:n_prompts]]
    roll = generate(model, tok, prompts, g.group_size, g.max_new_tokens, g.temperature, g.top_p)
    B = len(roll)
    gen = torch.Generator().manual_seed(0)
    adv, _ = group_advantages(torch.randint(0, 2, (B,), generator=gen).float(), g.group_size)
    mask = roll.completion_mask
    with torch.no_grad():
        logp0, _ = token_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, mask, g.temperature)
    old = (logp0 + noise * torch.randn(logp0.shape, generator=gen)) * mask

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = 1
    inputs = {
        "prompt_ids": roll.prompt_ids,
        "prompt_mask": roll.prompt_mask,
        "completion_ids": roll.completion_ids,
        "completion_mask": mask,
        "advantages": adv.float(),
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grad = torch.autograd.grad(trl_loss, params)
    with torch.no_grad():
        trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([roll.prompt_ids, roll.completion_ids], 1),
            torch.cat([roll.prompt_mask, mask], 1),
            mask.shape[1],
        )

    logp, _ = token_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, mask, g.temperature)
    out = policy_loss(logp, old, adv.float(), mask.float(), g.importance_sampling_level, eps_low, eps_high)
    our_grad = torch.autograd.grad(out.loss, params)
    grad_scale = max(float(t.abs().max()) for t in trl_grad)
    return {
        "trl_loss": trl_loss.item(),
        "our_loss": out.loss.item(),
        "logp_max_diff": float(((trl_logp - logp.detach()) * mask).abs().max()),
        "grad_max_rel_diff": max(float((a - b).abs().max()) for a, b in zip(trl_grad, our_grad)) / grad_scale,
        "clip_frac": out.metrics["clip_frac"],
        "trl_clip_frac": trainer._metrics["train"]["clip_ratio/region_mean"][-1],
    }


def agree(c: dict) -> bool:
    """Same loss, log-probs, gradient and clip fraction, up to float32 rounding."""
    return (
        math.isclose(c["trl_loss"], c["our_loss"], rel_tol=1e-4, abs_tol=1e-6)
        and c["logp_max_diff"] < 1e-4
        and c["grad_max_rel_diff"] < 1e-4
        and math.isclose(c["clip_frac"], c["trl_clip_frac"], abs_tol=1e-9)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed rollout steps per trainer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rollout steps at the start (imports, allocator)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    ap.add_argument(
        "--warm-start",
        type=int,
        default=300,
        help="supervised steps before both trainers start, so rewards are mixed as in real training "
        "(an untrained model scores 0 everywhere); 0 for none",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both sides)")
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="gspo-bench-trl-") as work:
        run(a, Path(work))


def run(a, work: Path) -> None:
    import trl

    model_dir = save_tiny(work / "tiny", seed=0)
    cfg = bench_config(a.warmup + a.steps, a.threads, [f"warm_start.steps={a.warm_start}", *a.set])
    splits = prepare_splits(cfg)
    if a.warm_start:
        model_dir = warm_start(cfg, model_dir, splits.warm_start, work / "warm_start")
    g = cfg.gspo
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"{a.threads} thread(s); per rollout step: {g.prompts_per_step} prompts x {g.group_size} completions "
        f"<= {g.max_new_tokens} tokens, {g.num_minibatches} AdamW updates of "
        f"{g.prompts_per_step * g.group_size // g.num_minibatches}; {g.importance_sampling_level} level, "
        f"clip {g.clip_range()}"
    )

    c = check_loss(cfg, model_dir, splits.train)
    print(
        f"loss check: TRL {c['trl_loss']:.9f} ours {c['our_loss']:.9f}, "
        f"log-prob max diff {c['logp_max_diff']:.1e}, grad max rel diff {c['grad_max_rel_diff']:.1e}, "
        f"clip fraction {c['clip_frac']:.3f} (TRL {c['trl_clip_frac']:.3f})"
    )
    if not agree(c):
        sys.exit("loss check failed: the two trainers do not optimise the same objective")

    secs, tokens = run_both(cfg, model_dir, splits, work)
    w = a.warmup
    paired = [t / o for o, t in zip(secs["ours"][w:], secs["trl"][w:])]
    for name in secs:
        print(f"{name:4s} s/step: " + " ".join(f"{x:.2f}" for x in secs[name][w:]))
    print(
        f"per-step ratios (TRL s / ours s, adjacent in time): median {statistics.median(paired):.2f}, "
        f"range {min(paired):.2f}-{max(paired):.2f}"
    )
    print(f"{'trainer':8s} {'s/step median':>14s} {'min':>6s} {'max':>6s} {'steps/s':>8s} {'compl. tok/s':>13s}")
    for name, s in secs.items():
        s = s[w:]
        tps = [t / x for t, x in zip(tokens[name][w:], s)]
        print(
            f"{name:8s} {statistics.median(s):14.2f} {min(s):6.2f} {max(s):6.2f} {1 / statistics.median(s):8.3f} "
            f"{statistics.median(tps):13.0f}"
        )
    zero = ZERO_STD[w:]
    print(
        f"groups with equal rewards (ours skips their rows in the update; TRL computes them): "
        f"{statistics.mean(zero):.2f} of groups per step, {min(zero):.2f}-{max(zero):.2f}"
    )
    print(f"ratio={statistics.median(secs['trl'][w:]) / statistics.median(secs['ours'][w:]):.2f}")


if __name__ == "__main__":
    main()
