"""One rollout batch's optimisation: the minibatch plan, old (and reference) log-probs, the clipped updates.

The phases after scoring, each a public function the trainer (gspo.trainer) and the GPU benchmark
(bench/gpu.py) both call:

    plan = make_plan(...)             which rows each of the num_minibatches updates trains, in which micro-batches
    old = logprobs(model, roll, plan) log pi_old of those rows, computed in exactly the micro-batches the
                                      update will use, so the first update's ratio is exactly 1
    result = run_updates(...)         num_minibatches clipped updates, each: forward/backward per micro-batch,
                                      a finite vote and gradient sum across ranks, clipping, the optimizer step

Rows of a global minibatch may live on several ranks: each rank trains its own and the loss is weighted to
the global minibatch, so summed gradients equal one process's.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gspo import distributed, metrics
from gspo.config import Config
from gspo.errors import Diverged
from gspo.loss import policy_loss
from gspo.rollout import Rollout, token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in a training step (sampling noise, minibatch order)."""
    return seed * 1_000_003 + step


def row_seeds(seed: int, step: int, n_rows: int, first: int, count: int) -> torch.Tensor:
    """Sampling seeds of global rows first .. first + count - 1 of a step of n_rows: the same draw for a row
    whatever the sharding."""
    return step_seed(seed, step) * n_rows + first + torch.arange(count, dtype=torch.int64)


@dataclass
class Minibatch:
    size: int  # rows of the global minibatch: the loss is a mean over all of them
    micro: list[torch.Tensor]  # this rank's rows to train (local indices, CPU), one tensor per forward/backward
    skipped: torch.Tensor  # this rank's rows left out: zero advantage with beta 0, so exactly zero gradient
    skipped_tokens: int = 0  # their completion tokens (the token-level clip fraction counts them)
    idle: int = 0  # passes with nothing to train that this rank runs to keep in step with the others (fsdp)


def make_plan(roll: Rollout, adv: torch.Tensor, cfg: Config, step: int, first: int, n_rows: int) -> list[Minibatch]:
    """Split the step's n_rows global rows, shuffled by the step's seed, into exactly gspo.num_minibatches
    near-equal minibatches (sizes differ by at most one); this rank holds global rows first .. first + len(roll) - 1.
    With beta 0 a row of zero advantage contributes exactly nothing, so it gets no forward or backward.
    Under train.sharding fsdp every forward gathers weights from all ranks, so each rank runs as many passes per
    minibatch as the busiest rank (the extra ones `idle`)."""
    g = cfg.gspo
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(step_seed(cfg.train.seed, step)))
    skip_zero = g.beta == 0
    nonzero = adv.detach().cpu() != 0
    lens = roll.completion_mask.sum(1).cpu()  # the plan's one read of the device
    out = []
    for mb in torch.tensor_split(perm, g.num_minibatches):
        mine = mb[(mb >= first) & (mb < first + len(roll))] - first
        keep = nonzero[mine] if skip_zero else torch.ones(len(mine), dtype=torch.bool)
        micro = micro_batches(mine[keep], lens, roll.prompt_ids.shape[1], cfg.optim.micro_batch_tokens)
        out.append(Minibatch(len(mb), micro, mine[~keep], int(lens[mine[~keep]].sum())))
    if cfg.train.sharding == "fsdp":
        for minibatch, most in zip(out, distributed.max_ints([len(m.micro) for m in out], adv.device)):
            minibatch.idle = most - len(minibatch.micro)
    return out


def micro_batches(idx: torch.Tensor, lens: torch.Tensor, prompt_width: int, budget: int) -> list[torch.Tensor]:
    """Split rows into forward/backward passes of about `budget` tokens each (rows x padded width: the prompt
    width plus the pass's longest completion). Rows go longest completion first, each pass taking as many as its
    first row's width allows, so rows of similar length share a pass and little of it is padding. The loss sums
    over rows, so the grouping changes only the order of float additions; old log-probs use the same passes."""
    if not len(idx):
        return []
    order = idx[torch.sort(lens[idx], descending=True, stable=True).indices]
    out, i = [], 0
    while i < len(order):
        n = max(1, budget // (prompt_width + max(1, int(lens[order[i]]))))
        out.append(order[i : i + n])
        i += n
    return out


@dataclass
class Pass:
    """One forward/backward: rows on the rollout's device, and the columns any of them uses."""

    rows: torch.Tensor
    prompt_from: int  # first prompt column holding a token of one of the rows (prompts are left-padded)
    width: int  # completion columns up to the longest row's last token (at least 1)
    idle: bool = False  # only keeps sharded ranks in step: its loss is weighted 0


def passes(roll: Rollout, plan: list[Minibatch]) -> list[list[Pass]]:
    """Each minibatch's passes, their columns from the rollout's host copy of its lengths and every row index sent
    to the device in one copy, so the loop over passes never waits for the GPU. An idle pass runs row 0."""
    plens, clens = (x.tolist() for x in roll.host_lengths())
    P = roll.prompt_ids.shape[1]
    idx = [m for mb in plan for m in mb.micro + [torch.zeros(1, dtype=torch.long)] * mb.idle]
    idle = [j >= len(mb.micro) for mb in plan for j in range(len(mb.micro) + mb.idle)]
    flat = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    sizes = [len(m) for m in idx]
    on_device, host = flat.to(roll.completion_ids.device).split(sizes), flat.tolist()
    bounds = list(itertools.accumulate(sizes, initial=0))
    made = [
        Pass(on_device[k], min(P - max(plens[r] for r in rows), P - 1), max(1, max(clens[r] for r in rows)), idle[k])
        for k, rows in enumerate(host[a:b] for a, b in itertools.pairwise(bounds))
    ]
    out, k = [], 0
    for mb in plan:
        n = len(mb.micro) + mb.idle
        out.append(made[k : k + n])
        k += n
    return out


def trimmed(roll: Rollout, p: Pass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pass's rows with all-padding prompt and completion columns cut off."""
    return (
        roll.prompt_ids[p.rows, p.prompt_from :],
        roll.prompt_mask[p.rows, p.prompt_from :],
        roll.completion_ids[p.rows, : p.width],
        roll.completion_mask[p.rows, : p.width],
    )


def autocast(device: torch.device) -> torch.autocast | nullcontext:
    # bf16 autocast only on CUDA: on CPU it is slow, and CPU weights are fp32 or already bf16.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def logprobs(model: PreTrainedModel, roll: Rollout, plan: list[Minibatch], temperature: float) -> torch.Tensor:
    """(len(roll), T) log-probs of every planned row under `model`, no gradient, zero on rows not planned.

    Computed pass by pass as the update computes them, in training mode (dropout is always off, gspo.models):
    same shapes, same kernels, so before the first update the two agree exactly."""
    device = roll.completion_ids.device
    out = torch.zeros(roll.completion_ids.shape, dtype=torch.float32, device=device)
    with torch.no_grad(), autocast(device):
        for mb_passes in passes(roll, plan):
            for p in mb_passes:
                lp, _ = token_logprobs(model, *trimmed(roll, p), temperature=temperature)
                if not p.idle:
                    out[p.rows, : p.width] = lp.float()
    return out


@dataclass
class UpdateResult:
    stats: dict | None = None  # loss statistics of the step's updates on this rank (gspo.metrics)
    finite: list[bool] = field(default_factory=list)  # per update: applied (True) or skipped as non-finite
    grad_norms: list[float] = field(default_factory=list)  # of the applied updates, before clipping
    lrs: list[float] = field(default_factory=list)  # the learning rate each update used
    stopped: bool = False  # max_consecutive_skips reached
    norm: float = math.nan  # the parameters' norm after the last applied update


def params_norm(params: Sequence[torch.Tensor]) -> float:
    """Total L2 norm of the parameters: one fused pass, one host read."""
    return float(distributed.total_norm([p.detach() for p in params]))


def _zero_grad(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    opt.zero_grad(set_to_none=True)
    for q in params:  # sharded, the optimizer holds views of the parameters, not the parameters themselves
        q.grad = None


def _check_norm(update: int, before: float, after: float) -> None:
    if not math.isfinite(after) or after > 2 * before:
        raise Diverged(f"update {update} took the weights' norm from {before:.4g} to {after:.4g}; lower optim.lr")


def run_updates(
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    roll: Rollout,
    adv: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    plan: list[Minibatch],
    cfg: Config,
    consecutive_skips: int = 0,
    norm_before: float | None = None,
    after_backward: Callable[[torch.nn.Module, int], None] | None = None,
    first_update: int = 0,
) -> UpdateResult:
    """The step's num_minibatches updates. A non-finite loss or gradient on any rank skips that update on all;
    after cfg.train.max_consecutive_skips in a row (counting `consecutive_skips` before this step) it stops.
    After each applied update the parameters' norm is checked: non-finite, or more than doubled by one update,
    raises Diverged (the step's weights are not to be kept). `after_backward(model, update_index)` runs
    after each update's backward passes, before the finite vote (gradient surgery, fault injection).

    The host reads the device once per update (the finite vote, the gradient norm and the previous update's
    weight norm together), never per pass."""
    g, o = cfg.gspo, cfg.optim
    device = roll.completion_ids.device
    eps_low, eps_high = g.clip_range()
    mask = roll.completion_mask.float()
    res = UpdateResult()
    norm = params_norm(params) if norm_before is None else norm_before
    pending = None  # (update index, weight norm after it on the device) until the next host read checks it
    for i, (mb, mb_passes) in enumerate(zip(plan, passes(roll, plan))):
        _zero_grad(opt, params)
        finite = torch.ones((), device=device)
        for p in mb_passes:
            rows, T = p.rows, p.width
            with autocast(device):
                logp, _ = token_logprobs(model, *trimmed(roll, p), temperature=g.temperature)
            out = policy_loss(
                logp,
                old_logp[rows, :T],
                adv[rows],
                mask[rows, :T],
                level=g.importance_sampling_level,
                eps_low=eps_low,
                eps_high=eps_high,
                ref_logp=None if ref_logp is None else ref_logp[rows, :T],
                beta=g.beta,
            )
            if p.idle:
                (out.loss * 0).backward()
                continue
            finite = finite * torch.isfinite(out.loss)
            # Weighted by rows of the global minibatch: summing over passes and ranks gives its mean.
            (out.loss * (len(rows) / mb.size)).backward()
            res.stats = metrics.add(res.stats, out.stats)
        if len(mb.skipped):
            res.stats = metrics.add(
                res.stats,
                metrics.skipped_rows(len(mb.skipped), mb.skipped_tokens, g.importance_sampling_level == "token", mask),
            )
        if after_backward is not None:
            after_backward(model, first_update + i)
        for q in params:
            # No rows here (or on this rank): a zero gradient still moves AdamW's moments, as computing them
            # would, and every rank joins the gradient all-reduce with a tensor.
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        finite = distributed.all_min(finite)
        distributed.sum_gradients(params)
        total = distributed.total_norm(distributed.grads(params))
        read = torch.stack([finite.double(), total.double()] + ([pending[1].double()] if pending else [])).tolist()
        if pending:
            _check_norm(pending[0], norm, read[2])
            norm, pending = read[2], None
        ok = read[0] > 0 and math.isfinite(read[1])
        res.lrs.append(float(sched.get_last_lr()[0]))
        if ok:
            if o.grad_clip > 0:
                distributed.clip_gradients(params, o.grad_clip, total)
            opt.step()
            res.grad_norms.append(read[1])
            pending = (first_update + i, distributed.total_norm([q.detach() for q in params]))
        _zero_grad(opt, params)
        with warnings.catch_warnings():
            # A skipped update still spends its place in the schedule; torch warns when no step came before.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            sched.step()
        res.finite.append(ok)
        consecutive_skips = 0 if ok else consecutive_skips + 1
        if consecutive_skips >= cfg.train.max_consecutive_skips:
            res.stopped = True
            break
    if pending:
        after = float(pending[1])
        _check_norm(pending[0], norm, after)
        norm = after
    res.stats = distributed.reduce_stats(res.stats, device)
    res.norm = norm
    return res
