"""Training metrics: every name logged per step, what it means, and how its parts add up.

The loss function returns sums and counts as tensors on the device (`policy_loss(...).stats`), so micro-batches,
minibatches and ranks combine by adding them (ratio_min / ratio_max by min and max), and the host reads them
once per step. A mean is then the same whatever the micro-batch, minibatch or rank split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gspo.update import UpdateResult

SUMS = ("rows", "loss", "clip_den", "clip", "clip_low", "clip_high", "ratio_sum", "ratio_n", "kl")
EXTREMES = {"ratio_min": torch.minimum, "ratio_max": torch.maximum}

NAMES = {
    "step": "rollout batches done",
    "reward_mean": "mean reward of the batch's completions",
    "reward_std": "their standard deviation",
    "reward/<task>": "mean reward per task",
    "advantage_mean": "mean group-normalised advantage (0 up to rounding)",
    "advantage_std": "standard deviation of the advantages",
    "advantage_abs_max": "largest |advantage|",
    "zero_std_group_frac": "share of groups whose rewards are all equal (zero advantage: nothing to learn)",
    "trained_frac": "share of rows with a forward and backward pass (with beta 0, rows of zero advantage have "
    "exactly zero gradient and are skipped)",
    "loss": "policy objective, negated, over all rows of the step (rows with zero advantage add 0)",
    "clip_frac": "share clipped (the clipped term won the min, so the gradient was cut): of all rows at the "
    "sequence levels (a GSPO-token row counts by its share of clipped tokens), of all completion "
    "tokens at the token level",
    "clip_frac_low": "the same, below 1 - eps_low with a negative advantage",
    "clip_frac_high": "the same, above 1 + eps_high with a positive advantage",
    "ratio_mean": "mean importance ratio over the trained rows (sequence levels: s_i) or their tokens (token level)",
    "ratio_min": "smallest of those ratios",
    "ratio_max": "largest of those ratios",
    "kl": "k3 estimate of KL(policy || reference), per-sequence mean then mean over rows (with a reference)",
    "entropy": "mean entropy of the sampling distribution over completion tokens",
    "completion_len_mean": "mean completion length in tokens",
    "completion_len_max": "longest completion",
    "truncated_frac": "share of completions cut at max_new_tokens",
    "grad_norm": "mean gradient norm (before clipping) over the step's applied updates",
    "lr": "learning rate of the step's last update",
    "skipped_updates": "updates skipped so far for a non-finite loss or gradient",
    "tokens_per_s": "prompt and completion tokens of the batch (padding excluded) per second of the whole step",
    "rollout_tokens_per_s": "completion tokens per second of sampling",
    "time_rollout_s": "seconds sampling",
    "time_reward_s": "seconds scoring",
    "time_update_s": "seconds computing old log-probs and updating",
    "eval_reward": "greedy reward on the held-out split (every train.eval_every steps)",
}


def add(total: dict[str, torch.Tensor] | None, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """total + stats, key by key (sums added, extremes kept); no host synchronisation."""
    if total is None:
        return dict(stats)
    out = dict(total)
    for k, v in stats.items():
        out[k] = v if k not in out else EXTREMES[k](out[k], v) if k in EXTREMES else out[k] + v
    return out


def skipped_rows(n_rows: int, n_tokens: int, token_level: bool, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """What rows never computed (zero advantage, no KL term) add: their objective is exactly 0 and they are never
    clipped, so they count in the denominators of loss and clip fractions; their ratios are unknown."""
    zero = like.new_zeros((), dtype=torch.float32)
    return {
        "rows": zero + n_rows,
        "loss": zero,
        "clip_den": zero + (n_tokens if token_level else n_rows),
        "clip": zero,
        "clip_low": zero,
        "clip_high": zero,
    }


def finish(stats: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Means from sums, read with one host transfer. Fractions of nothing are 0; ratios of nothing are left out."""
    if not stats:
        return {}
    keys = list(stats)
    v = dict(zip(keys, torch.stack([stats[k].detach().double().reshape(()) for k in keys]).tolist()))
    out = {}
    if v.get("rows"):
        out["loss"] = v["loss"] / v["rows"]
        if "kl" in v:
            out["kl"] = v["kl"] / v["rows"]
    if "clip_den" in v:
        den = v["clip_den"]
        for name, key in (("clip_frac", "clip"), ("clip_frac_low", "clip_low"), ("clip_frac_high", "clip_high")):
            if key in v:
                out[name] = v[key] / den if den else 0.0
    if v.get("ratio_n"):
        out |= {"ratio_mean": v["ratio_sum"] / v["ratio_n"], "ratio_min": v["ratio_min"], "ratio_max": v["ratio_max"]}
    return out


def step_metrics(
    reward: torch.Tensor,
    per_task: dict[str, list[float]],
    adv: torch.Tensor,
    zero_group_frac: float,
    trained_frac: float,
    result: UpdateResult,
    entropy: float,
    lens: torch.Tensor,
    truncated: torch.Tensor,
) -> dict:
    """The step's metrics (NAMES) from the global batch's rewards (B,), advantages (B,), completion lengths (B,),
    truncation flags (B,), and the update phase's result (gspo.update.UpdateResult, stats already over ranks)."""
    norms = result.grad_norms
    return {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std(unbiased=False)),
        **{f"reward/{k}": sum(v) / len(v) for k, v in per_task.items()},
        "advantage_mean": float(adv.mean()),
        "advantage_std": float(adv.std(unbiased=False)),
        "advantage_abs_max": float(adv.abs().max()),
        "zero_std_group_frac": zero_group_frac,
        "trained_frac": trained_frac,
        **finish(result.stats),
        "entropy": entropy,
        "completion_len_mean": float(lens.mean()),
        "completion_len_max": float(lens.max()),
        "truncated_frac": float(truncated.mean()),
        "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
        "lr": result.lrs[-1],
    }
