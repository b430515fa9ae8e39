"""Rollouts: G sampled completions per prompt, and per-token log-probs of completions under a model."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded prompts, B = n_prompts * G, each group contiguous
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T) right-padded, EOS kept when sampled
    completion_mask: torch.Tensor  # (B, T) 1 up to and including EOS
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    texts: list[str]  # decoded completions, special tokens removed

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.truncated[idx], [self.texts[i] for i in idx.tolist()])


def encode_prompts(tokenizer, prompts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.truncation_side = "left"  # keep the end of a long prompt: that is where the question is
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_mask(completion_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, T) covering tokens up to and including the first EOS, and whether no EOS was produced."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    # Positions strictly after the first EOS are padding: count EOS seen before each position.
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = (seen_before == 0).long()
    return mask, ~is_eos.any(dim=1)


def eos_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, max_prompt_length: int = 512, do_sample: bool = True, batch_size: int = 0) -> Rollout:
    """Sample `group_size` completions for each prompt (greedy when do_sample is False)."""
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(group_size)]
    eos = eos_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    chunks = []
    step = batch_size or len(repeated)
    for i in range(0, len(repeated), step):
        ids, attn = encode_prompts(tokenizer, repeated[i:i + step], max_prompt_length, device)
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=do_sample, max_new_tokens=max_new_tokens,
                             temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                             top_k=0 if do_sample else None, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(eos), use_cache=True)
        chunks.append((ids, attn, out[:, ids.shape[1]:]))
    model.train(was_training)
    prompt_ids = _cat_left([c[0] for c in chunks], tokenizer.pad_token_id)
    prompt_mask = _cat_left([c[1] for c in chunks], 0)
    comp = _cat_right([c[2] for c in chunks], tokenizer.pad_token_id)
    mask, truncated = completion_mask(comp, eos)
    comp = torch.where(mask.bool(), comp, torch.full_like(comp, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, comp, mask, truncated, texts)


def _cat_left(ts: list[torch.Tensor], pad: int) -> torch.Tensor:
    width = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=pad) for t in ts])


def _cat_right(ts: list[torch.Tensor], pad: int) -> torch.Tensor:
    width = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in ts])


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Per-token log pi(y_t) of the completion tokens, (B, T); and the per-token entropy when asked.

    Logits are divided by the sampling temperature so the ratio compares the distributions that were sampled.
    Only completion positions are materialised in float32, which keeps memory at B * T * V, not B * (P+T) * V.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask, completion_mask], dim=1)
    # Positions follow the real tokens so left padding does not shift them.
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, -T - 1:-1, :].float() / temperature  # (B, T, V): logits at t predict token t
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
