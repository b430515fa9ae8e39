"""Clipped policy objectives: GSPO, GSPO-token (Zheng et al. 2025, arXiv 2507.18071) and GRPO.

Shapes: B sequences, T completion positions (prompt tokens are never in these tensors).
Normalisation is TRL's loss_type="grpo": mean over a sequence's tokens, then mean over all B
sequences. A sequence with no completion tokens counts as length 1: it adds zero to the sum,
still counts in B, and has sequence ratio exactly 1 (so it is never clipped).
"""

from dataclasses import dataclass

import torch

from gspo import metrics as M
from gspo.config import LEVELS


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backprop: policy loss + beta * kl, mean over the B sequences
    stats: dict[str, torch.Tensor]  # sums and counts on the device (gspo.metrics); adding them never syncs

    @property
    def metrics(self) -> dict[str, float]:
        """loss (policy part), ratio_mean/min/max, clip_frac(_low/_high), kl (with ref_logp) as numbers."""
        return M.finish(self.stats)


def policy_loss(
    logp: torch.Tensor,  # (B, T) log pi_theta of the completion tokens, with grad
    old_logp: torch.Tensor,  # (B, T) log pi_old, the policy that sampled them
    advantages: torch.Tensor,  # (B,) per sequence, or (B, T) per token (sequence_token, token)
    mask: torch.Tensor,  # (B, T) 1 on completion tokens, 0 on padding
    level: str = "sequence",
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    ref_logp: torch.Tensor | None = None,  # (B, T) log pi_ref; gives the kl metric, and the penalty if beta > 0
    beta: float = 0.0,
    log_ratio_cap: float = 20.0,
) -> LossOutput:
    B, T = logp.shape
    if level not in LEVELS:
        raise ValueError(f"policy_loss: level={level!r}, expected one of {LEVELS}")
    if old_logp.shape != (B, T) or mask.shape != (B, T) or (ref_logp is not None and ref_logp.shape != (B, T)):
        raise ValueError(f"policy_loss: old_logp/mask/ref_logp must have logp's shape {(B, T)}")
    if advantages.shape != (B,) and (level == "sequence" or advantages.shape != (B, T)):
        raise ValueError(
            f"policy_loss: advantages shape {tuple(advantages.shape)}, expected {(B,)}"
            + ("" if level == "sequence" else f" or {(B, T)}")
        )
    if beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp")

    dtype = torch.promote_types(logp.dtype, torch.float32)  # exp and means never in bf16/fp16
    m = mask.bool()  # (B, T)
    n = m.sum(-1).clamp(min=1).to(dtype)  # (B,) completion length, 0 counted as 1
    # Padding may hold anything, even -inf: select rather than multiply, so it reaches neither exp nor grads.

    def seq_mean(x):  # (B, T) -> (B,)
        return torch.where(m, x, 0.0).sum(-1) / n

    lp = torch.where(m, logp.to(dtype), 0.0)  # (B, T)
    log_r = torch.where(m, lp - old_logp.to(dtype), 0.0)  # (B, T) per-token log ratio
    log_s = seq_mean(log_r)  # (B,) log of the length-normalised sequence ratio s_i
    # The cap only keeps exp finite (fp32 overflows past ~88); e^20 ~ 5e8 never binds on sane inputs.
    # Where it does bind the gradient through the ratio is cut, like clamp's.
    log_s = log_s.clamp(max=log_ratio_cap)
    A = advantages.to(dtype)
    if level == "sequence":
        ratio = log_s.exp()  # (B,)
    elif level == "sequence_token":
        # value sg[s_i] on every token, gradient that of s_i * pi(y_t) / sg[pi(y_t)]
        ratio = (lp - lp.detach() + log_s.detach()[:, None]).exp()  # (B, T)
    else:
        ratio = log_r.clamp(max=log_ratio_cap).exp()  # (B, T)
    if A.dim() < ratio.dim():
        A = A[:, None]  # per-sequence advantage on every token

    obj = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # (B,) or (B, T)
    per_seq = torch.where(m.any(-1), obj, 0.0) if level == "sequence" else seq_mean(obj)  # (B,)
    loss = -per_seq.mean()

    # The gradient is cut where the clipped term wins the min: above the range with A > 0, below with A < 0.
    high = (ratio > 1 + eps_high) & (A > 0)
    low = (ratio < 1 - eps_low) & (A < 0)
    with torch.no_grad():
        if level == "token":  # fractions and ratios over completion tokens

            def count(x: torch.Tensor) -> torch.Tensor:
                return (x & m).sum().to(dtype)

            den = m.sum().to(dtype)
            r_sum = torch.where(m, ratio, 0.0).sum()
            r_min, r_max = torch.where(m, ratio, torch.inf).amin(), torch.where(m, ratio, -torch.inf).amax()
        else:  # over sequences; a GSPO-token sequence counts by the share of its tokens clipped

            def count(x: torch.Tensor) -> torch.Tensor:
                return (x.to(dtype) if level == "sequence" else seq_mean(x.to(dtype))).sum()

            den = n.new_full((), float(B))
            r = log_s.exp()
            r_sum, r_min, r_max = r.sum(), r.amin(), r.amax()
        stats = {
            "rows": n.new_full((), float(B)),
            "loss": -per_seq.sum(),
            "clip_den": den,
            "clip": count(high | low),
            "clip_low": count(low),
            "clip_high": count(high),
            "ratio_sum": r_sum,
            "ratio_n": den,
            "ratio_min": r_min,
            "ratio_max": r_max,
        }

    if ref_logp is not None:
        d = torch.where(m, ref_logp.to(dtype) - lp, 0.0).clamp(max=log_ratio_cap)  # (B, T) log(pi_ref / pi)
        kl_seq = seq_mean(d.exp() - d - 1)  # (B,) k3 estimate of KL(pi || pi_ref): >= 0, unbiased on samples from pi
        loss = loss + beta * kl_seq.mean()
        stats["kl"] = kl_seq.detach().sum()
    return LossOutput(loss=loss, stats=stats)
