"""Optimizers and the learning-rate schedule, with updates that survive bf16 weights.

An Adam step moves a weight by about lr. Written to a bf16 weight with round-to-nearest, a step smaller than
half the weight's ulp (2^-9 of its magnitude: 6e-5 for a weight near 0.02, 2e-3 near 1.0) is lost, so at the
learning rates of fine-tuning (1e-6 .. 1e-5) bf16 weights barely move. bitsandbytes' kernels round to nearest
(its issue 1165). Here each low-precision parameter's step runs in fp32 on a transient copy, one parameter
at a time (a few GB for the largest matrix of a 7B model, never a master copy of the model), and the result
is written back by `optim.low_precision_update`:

- stochastic: rounded up or down with the probability that makes the written value's expectation the fp32
  result (bf16 only; no extra memory). Over many steps the realised change follows the fp32 change, plus
  zero-mean noise of about one ulp times the square root of the number of steps;
- kahan: the rounding error is kept in a bf16 buffer per parameter and added back before the next step, so
  the weight never trails the fp32 trajectory by more than half an ulp (2 bytes per parameter);
- nearest: round-to-nearest, what the kernels do on their own (small updates are lost).

fp32 parameters (CPU training, LoRA adapters) are updated directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gspo.config import OptimConfig


def _rounding_adamw():
    import bitsandbytes as bnb

    class RoundingAdamW(bnb.optim.AdamW):
        """bitsandbytes AdamW (8- or 32-bit states) whose low-precision parameters are stepped in fp32."""

        def __init__(self, params: list[torch.nn.Parameter], rounding: str, seed: int, **kw: Any) -> None:
            super().__init__(params, **kw)
            self.rounding = rounding
            self.seed = seed
            self._generators: dict[torch.device, torch.Generator] = {}

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            if p.dtype == torch.float32:
                return super().update_step(group, p, gindex, pindex)
            low, grad, state = p.data, p.grad, self.state[p]
            full = low.float()
            if self.rounding == "kahan":
                comp = state.setdefault("kahan", torch.zeros_like(low))
                full += comp
            p.data, p.grad = full, grad.float()
            try:
                super().update_step(group, p, gindex, pindex)
                full = p.data
            finally:
                p.data, p.grad = low, grad
            if self.rounding == "stochastic":
                low.copy_(stochastic_round(full, self._generator(low.device)))
            else:
                low.copy_(full)
                if self.rounding == "kahan":
                    comp.copy_(full - low.float())

        def _generator(self, device: torch.device) -> torch.Generator:
            if device not in self._generators:
                # Its own stream, saved with the optimizer: resuming draws the same roundings.
                self._generators[device] = torch.Generator(device).manual_seed(self.seed)
            return self._generators[device]

        def state_dict(self):
            sd = super().state_dict()
            sd["rounding_generators"] = {str(d): g.get_state() for d, g in self._generators.items()}
            return sd

        def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
            state_dict = dict(state_dict)
            gens = state_dict.pop("rounding_generators", {})
            super().load_state_dict(state_dict, move_to_device)
            for d, s in gens.items():
                self._generator(torch.device(d)).set_state(s)

    return RoundingAdamW


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 x rounded to bf16, up or down with probabilities that make the result's expectation x.

    bf16 is the top 16 bits of fp32: adding uniform noise below them and cutting them off rounds away from
    zero with probability (the cut-off part / 2^16). NaN and infinities are passed through as they are."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW over `params` as cfg says; low-precision parameters get cfg.low_precision_update."""
    params = list(params)
    lr, betas, weight_decay = cfg.lr, (cfg.betas[0], cfg.betas[1]), cfg.weight_decay
    low = [p for p in params if p.dtype != torch.float32]
    if low and cfg.low_precision_update == "stochastic" and any(p.dtype != torch.bfloat16 for p in low):
        raise ValueError(
            "optim.low_precision_update: stochastic rounding is for bfloat16 weights; use kahan for float16"
        )
    if cfg.optimizer == "adamw8bit" or low:
        return _rounding_adamw()(
            params,
            cfg.low_precision_update,
            seed,
            optim_bits=8 if cfg.optimizer == "adamw8bit" else 32,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
        )
    # fp32 weights: the fused kernel is several times faster than the per-tensor loop, on the CPU too.
    return torch.optim.AdamW(params, fused=True, lr=lr, betas=betas, weight_decay=weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_updates: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of it."""
    warm = cfg.warmup_steps

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = min(1.0, (i - warm) / max(1, total_updates - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
