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

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from gspo import distributed, metrics
from gspo.config import Config
from gspo.errors import Diverged
from gspo.loss import policy_loss
from gspo.rollout import Rollout, token_logprobs


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
    micro: list[torch.Tensor]  # this rank's rows to train (local indices), one tensor per forward/backward
    skipped: torch.Tensor  # this rank's rows left out: zero advantage with beta 0, so exactly zero gradient


def make_plan(roll: Rollout, adv: torch.Tensor, cfg: Config, step: int, first: int, n_rows: int) -> list[Minibatch]:
    """Split the step's n_rows global rows, shuffled by the step's seed, into exactly gspo.num_minibatches
    near-equal minibatches (sizes differ by at most one); this rank holds global rows first .. first + len(roll) - 1.
    With beta 0 a row of zero advantage contributes exactly nothing, so it gets no forward or backward."""
    g = cfg.gspo
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(step_seed(cfg.train.seed, step)))
    skip_zero = g.beta == 0
    nonzero = adv.detach().cpu() != 0
    out = []
    for mb in torch.tensor_split(perm, g.num_minibatches):
        mine = mb[(mb >= first) & (mb < first + len(roll))] - first
        keep = nonzero[mine] if skip_zero else torch.ones(len(mine), dtype=torch.bool)
        out.append(Minibatch(len(mb), micro_batches(mine[keep], roll, cfg.optim.micro_batch_tokens), mine[~keep]))
    return out


def micro_batches(idx: torch.Tensor, roll: Rollout, budget: int) -> list[torch.Tensor]:
    """Split rows so each forward/backward holds about `budget` tokens (padded width x rows)."""
    if not len(idx):
        return []
    width = roll.prompt_ids.shape[1] + int(roll.completion_mask[idx].sum(1).max())
    rows = max(1, budget // max(1, width))
    return [idx[i:i + rows] for i in range(0, len(idx), rows)]


def trimmed(roll: Rollout, idx: torch.Tensor):
    """The rows of a micro-batch with all-padding prompt and completion columns cut off."""
    pm, cm = roll.prompt_mask[idx], roll.completion_mask[idx]
    p0 = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else pm.shape[1] - 1
    t1 = max(1, int(cm.sum(1).max()))
    return roll.prompt_ids[idx, p0:], pm[:, p0:], roll.completion_ids[idx, :t1], cm[:, :t1]


def autocast(device: torch.device):
    # bf16 autocast only on CUDA: on CPU it is slow, and CPU weights are fp32 or already bf16.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def logprobs(model, roll: Rollout, plan: list[Minibatch], temperature: float) -> torch.Tensor:
    """(len(roll), T) log-probs of every planned row under `model`, no gradient, zero on rows not planned.

    Computed micro-batch by micro-batch as the update computes them, in training mode (dropout is always off,
    gspo.models): same shapes, same kernels, so before the first update the two agree exactly."""
    device = roll.completion_ids.device
    out = torch.zeros(roll.completion_ids.shape, dtype=torch.float32, device=device)
    with torch.no_grad(), autocast(device):
        for mb in plan:
            for micro in mb.micro:
                lp, _ = token_logprobs(model, *trimmed(roll, micro), temperature=temperature)
                out[micro, :lp.shape[1]] = lp.float()
    return out


@dataclass
class UpdateResult:
    stats: dict | None = None  # loss statistics of the step's updates on this rank (gspo.metrics)
    finite: list[bool] = field(default_factory=list)  # per update: applied (True) or skipped as non-finite
    grad_norms: list[float] = field(default_factory=list)  # of the applied updates, before clipping
    lrs: list[float] = field(default_factory=list)  # the learning rate each update used
    stopped: bool = False  # max_consecutive_skips reached
    norm: float = math.nan  # the parameters' norm after the last applied update


def params_norm(params: list[torch.Tensor]) -> float:
    """Total L2 norm of the parameters: one fused pass, one host read."""
    return float(torch.nn.utils.get_total_norm([p.detach() for p in params]))


def run_updates(model, opt, sched, params: list[torch.nn.Parameter], roll: Rollout, adv: torch.Tensor,
                old_logp: torch.Tensor, ref_logp: torch.Tensor | None, plan: list[Minibatch], cfg: Config,
                consecutive_skips: int = 0, norm_before: float | None = None,
                after_backward: Callable[[torch.nn.Module, int], None] | None = None,
                first_update: int = 0) -> UpdateResult:
    """The step's num_minibatches updates. A non-finite loss or gradient on any rank skips that update on all;
    after cfg.train.max_consecutive_skips in a row (counting `consecutive_skips` before this step) it stops.
    After each applied update the parameters' norm is checked: non-finite, or more than doubled by one update,
    raises Diverged (the step's weights are not to be kept). `after_backward(model, update_index)` runs
    after each update's backward passes, before the finite vote (gradient surgery, fault injection)."""
    g, o = cfg.gspo, cfg.optim
    device = roll.completion_ids.device
    eps_low, eps_high = g.clip_range()
    mask = roll.completion_mask.float()
    res = UpdateResult()
    norm = params_norm(params) if norm_before is None else norm_before
    for i, mb in enumerate(plan):
        opt.zero_grad(set_to_none=True)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for micro in mb.micro:
            pids, pm, cids, cm = trimmed(roll, micro)
            T = cids.shape[1]
            with autocast(device):
                logp, _ = token_logprobs(model, pids, pm, cids, cm, temperature=g.temperature)
            out = policy_loss(logp, old_logp[micro, :T], adv[micro], mask[micro, :T], level=g.importance_sampling_level,
                              eps_low=eps_low, eps_high=eps_high,
                              ref_logp=None if ref_logp is None else ref_logp[micro, :T], beta=g.beta)
            finite &= torch.isfinite(out.loss)
            # Weighted by rows of the global minibatch: summing over micro-batches and ranks gives its mean.
            (out.loss * (len(micro) / mb.size)).backward()
            res.stats = metrics.add(res.stats, out.stats)
        if len(mb.skipped):
            n_tok = int(roll.completion_mask[mb.skipped].sum())
            res.stats = metrics.add(res.stats, metrics.skipped_rows(len(mb.skipped), n_tok,
                                                                     g.importance_sampling_level == "token", mask))
        if after_backward is not None:
            after_backward(model, first_update + i)
        for p in params:
            # No rows here (or on this rank): a zero gradient still moves AdamW's moments, as computing them
            # would, and every rank joins the gradient all-reduce with a tensor.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ok = distributed.all_finite(bool(finite), device)
        grad_norm = float("nan")
        if ok:
            distributed.sum_gradients(params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf))
            ok = math.isfinite(grad_norm)
        res.lrs.append(sched.get_last_lr()[0])
        if ok:
            opt.step()
            res.grad_norms.append(grad_norm)
            new_norm = params_norm(params)
            if not math.isfinite(new_norm) or new_norm > 2 * norm:
                raise Diverged(f"update {first_update + i} took the weights' norm from {norm:.4g} to {new_norm:.4g}; "
                               "lower optim.lr")
            norm = new_norm
        opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped update still spends its place in the schedule; torch warns when no step came before.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            sched.step()
        res.finite.append(ok)
        consecutive_skips = 0 if ok else consecutive_skips + 1
        if consecutive_skips >= cfg.train.max_consecutive_skips:
            res.stopped = True
            break
    res.stats = distributed.reduce_stats(res.stats, device)
    res.norm = norm
    return res
