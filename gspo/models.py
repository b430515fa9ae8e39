"""Model loading: device, dtype, threads, dropout off, fp32 logits, gradient checkpointing, LoRA."""

from __future__ import annotations

import types
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from gspo.config import ModelConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def use_threads(n: int) -> None:
    """torch's CPU threads for this process (0 leaves torch's default): the one place that sets them."""
    if n:
        torch.set_num_threads(n)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 weights on CUDA; CPU matmuls in bf16 are slow and lossy, so fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), revision=revision)
    tok.padding_side = "left"  # generation appends to the right of every prompt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, cfg: ModelConfig, device: torch.device, trainable: bool = True) -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id, with the config's dtype, checkpointing and LoRA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), revision=cfg.revision)
    kw = {"dtype": resolve_dtype(cfg.dtype, device), "revision": cfg.revision, "config": without_dropout(config)}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    loaded = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    # transformers wraps PreTrainedModel.to with functools.wraps, which the type checker reads as unbound.
    model = fp32_logits(loaded.to(device))  # type: ignore[arg-type]
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    return prepare_for_training(model, cfg)


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """The model config with every dropout probability set to 0 (TRL's disable_dropout does the same).

    GSPO's ratio compares the training forward with the distribution that sampled the completions; dropout
    would make the first a random perturbation of the second (a LoRA dropout of 0.1 alone clips 2 in 3
    sequences of an update that should be exactly on-policy), and the sampler never uses dropout."""
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
    return config


def fp32_logits(model: PreTrainedModel) -> PreTrainedModel:
    """Compute the LM head in fp32 when the weights are not.

    bf16 logits of a 152k vocabulary carry errors of about 0.05 nats per token, two orders of magnitude above
    GSPO's 3e-4 clip range, so every log-prob (sampling, old, new, reference) comes from fp32 logits, as TRL's
    cast_lm_head_to_fp32 and verl do. The weight is cast on the fly: no second copy is kept."""
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32 or not isinstance(head, torch.nn.Linear):
        return model

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(
                x.float(), self.weight.float(), None if self.bias is None else self.bias.float()
            )

    head.forward = types.MethodType(forward, head)  # type: ignore[method-assign]
    return model


def prepare_for_training(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Activation checkpointing and LoRA as the config asks; the model in train mode (a PEFT wrapper with LoRA).

    Dropout modules are switched off (see `without_dropout`), so train mode changes nothing but checkpointing."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
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
        # The LoRA wrapper forwards every attribute to the model it wraps, so it is used as one.
        model = get_peft_model(  # type: ignore[assignment]
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(cfg.lora_target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Full weights for plain models; PEFT models are merged so every checkpoint loads with transformers alone."""
    to_save = model
    if hasattr(model, "merge_and_unload"):
        import copy

        to_save = cast("PeftModel", copy.deepcopy(model)).merge_and_unload()
    to_save.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
