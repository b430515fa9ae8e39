"""Model loading, dtype, gradient checkpointing, LoRA, optimizer and schedule."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from gspo.config import ModelConfig, OptimConfig


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 weights on CUDA; CPU matmuls in bf16 are slow and lossy, so fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), revision=revision)
    tok.padding_side = "left"  # generation appends to the right of every prompt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, cfg: ModelConfig, device: torch.device, trainable: bool = True):
    """Load a causal LM from a local directory or hub id, with the config's dtype, checkpointing and LoRA."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": resolve_dtype(cfg.dtype, device), "revision": cfg.revision}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).to(device)
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    return prepare_for_training(model, cfg)


def prepare_for_training(model, cfg: ModelConfig):
    """Activation checkpointing and LoRA as the config asks; the model in train mode (a PEFT wrapper with LoRA)."""
    if cfg.gradient_checkpointing:
        # transformers 5 renamed gradient checkpointing to activation checkpointing.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    # The fused kernel is several times faster than the per-tensor loop, on the CPU too.
    return torch.optim.AdamW(params, fused=all(p.is_floating_point() for p in params), **kw)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_updates: int):
    """Linear warmup to the peak, then cosine decay to min_lr_ratio of it."""
    warm = cfg.warmup_steps

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = min(1.0, (i - warm) / max(1, total_updates - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Full weights for plain models; PEFT models are merged so every checkpoint loads with transformers alone."""
    to_save = model
    if hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
