"""Group-normalised advantages: A_i = (r_i - mean_group) / (std_group + eps).

std is the unbiased (Bessel-corrected) one, as in TRL (`nanstd`) and verl (`torch.std`), so
numbers compare with theirs; eps is added to std as they do (TRL uses 1e-4, verl 1e-6).
"""

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """rewards: (B,) with B = n_groups * group_size, each group's completions contiguous.

    Returns (advantages (B,), number of groups whose rewards are all equal). Such a group, and any
    group of size 1, has exactly zero advantages: it carries no signal about which completion is better.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards shape {tuple(rewards.shape)} is not (n_groups * {group_size},)")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"group_advantages: non-finite rewards at indices {bad}")
    r = (rewards if rewards.is_floating_point() else rewards.double()).view(-1, group_size)  # (n_groups, G)
    # Compare extremes rather than std to 0: a mean of equal floats can miss them by an ulp.
    flat = r.amax(1) == r.amin(1)  # (n_groups,)
    std = r.std(1, correction=1 if group_size > 1 else 0)  # (n_groups,)
    a = (r - r.mean(1, keepdim=True)) / (std[:, None] + eps)
    a = torch.where(flat[:, None], 0.0, a)
    return a.flatten(), int(flat.sum())
