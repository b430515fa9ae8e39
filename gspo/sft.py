"""Supervised warm start: next-token loss on reference answers, before any reinforcement learning."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from gspo import checkpoint
from gspo.config import Config
from gspo.data import Example, format_prompt
from gspo.models import load_model, load_tokenizer, pick_device


def target_text(example: Example) -> str:
    """What the model should write: a demonstration when the data gives one, else the reference itself."""
    if "demonstration" in example.meta:
        return example.meta["demonstration"]
    ref = example.reference
    if isinstance(ref, dict) and "canonical_solution" in ref:
        return ref["canonical_solution"]
    return str(ref)


def warm_start(cfg: Config, model_dir: str | Path, examples: list[Example], out_dir: str | Path,
               on_step=None) -> Path:
    """Fine-tune on (prompt, reference + EOS) pairs for cfg.warm_start.steps steps; save to out_dir."""
    w = cfg.warm_start
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, cfg.model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.lr, weight_decay=0.0)
    pairs = [(format_prompt(tok, e, cfg.data.use_chat_template), target_text(e) + tok.eos_token) for e in examples]
    for step in range(w.steps):
        batch = rng.sample(pairs, min(w.batch_size, len(pairs)))
        ids, labels = _encode(tok, batch, cfg.gspo.max_prompt_length + cfg.gspo.max_new_tokens)
        ids, labels = ids.to(device), labels.to(device)
        attn = (ids != tok.pad_token_id).long() | (labels != -100).long()
        lr = w.lr * 0.5 * (1 + torch.cos(torch.tensor(step / max(1, w.steps) * torch.pi))).item()
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step({"step": step + 1, "sft_loss": loss.item()})
    return checkpoint.save_weights(model, tok, Path(out_dir), {"warm_start_steps": w.steps})


def _encode(tok, pairs: list[tuple[str, str]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids, with labels only on the answer (-100 elsewhere)."""
    rows = []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids
        ids = (p + a)[-max_len:]
        lab = ([-100] * len(p) + a)[-max_len:]
        rows.append((ids, lab))
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(lab)] = torch.tensor(lab)
    return ids, labels
