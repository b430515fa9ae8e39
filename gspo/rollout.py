"""Rollouts: G sampled completions per prompt, and per-token log-probs of completions under a model."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gspo import distributed, static_decode
from gspo.sampling import Decoded, pick, plain, prefill
from gspo.static_decode import StaticDecodeUnavailable, sample_static

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded prompts, B = n_prompts * G, each group contiguous
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T) right-padded, EOS kept when sampled
    completion_mask: torch.Tensor  # (B, T) 1 up to and including EOS
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    texts: list[str]  # decoded completions, special tokens removed
    logp: torch.Tensor | None = None  # (B, T) log-probs of the sampled tokens under the sampling policy
    entropy: torch.Tensor | None = None  # (B, T) entropy of the sampling distribution at each position
    _lengths: tuple | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def host_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) prompt and completion lengths on the CPU, read from the device once: planning and trimming
        micro-batches from them never waits for the GPU."""
        if self._lengths is None:
            both = torch.stack([self.prompt_mask.sum(1), self.completion_mask.sum(1)]).cpu()
            self._lengths = (both[0], both[1])
        return self._lengths

    def select(self, idx: torch.Tensor) -> Rollout:
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx]

        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            self.truncated[idx],
            [self.texts[i] for i in idx.tolist()],
            pick(self.logp),
            pick(self.entropy),
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.truncation_side = "left"  # keep the end of a long prompt: that is where the question is
    enc = tokenizer(
        prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False
    )
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


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}


def sample(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    row_seeds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    lockstep: bool = False,
) -> Decoded:
    """Decode up to max_new_tokens with a KV cache; greedy when row_seeds is None.

    rows (B,), when given, is the prompt each completion continues (an index into prompt_ids): each distinct
    prompt is prefilled once and its cache copied to its rows, so a group of G completions pays for its prompt
    once instead of G times. Without rows, completion b continues prompt b. lockstep: every rank decodes until
    all ranks' rows have finished (a sharded model's forward needs every rank).

    Returns (B, T) completion ids, padded after each row's EOS, and when sampling the (B, T) log-probs and
    entropies of the tempered distribution the tokens were drawn from (None when greedy).
    """
    # inference_mode, unlike no_grad, skips autograd's version counters and view tracking on every op: about a
    # tenth of the decode time of a small model on the CPU. FSDP writes gathered weights into buffers it reuses
    # later, which must not become inference tensors.
    with torch.no_grad() if lockstep else torch.inference_mode():
        out = _decode(
            model,
            prompt_ids,
            prompt_mask,
            max_new_tokens,
            eos_ids,
            pad_id,
            temperature,
            top_p,
            row_seeds,
            rows,
            lockstep,
        )
    return plain(out)


def _decode(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float,
    top_p: float,
    row_seeds: torch.Tensor | None,
    rows: torch.Tensor | None,
    lockstep: bool,
) -> Decoded:
    eos = torch.tensor(sorted(eos_ids), device=prompt_ids.device)
    attn = prompt_mask
    logits, cache, last_pos, cache_arg = prefill(model, prompt_ids, prompt_mask)
    next_pos = last_pos + 1
    if rows is not None:
        cache.batch_select_indices(rows)
        logits, attn, next_pos = logits[rows], attn[rows], next_pos[rows]
    B = attn.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        nxt, lp, ent, done = pick(logits, row_seeds, t, done, eos, pad_id, temperature, top_p)
        if lp is not None and ent is not None:
            logps.append(lp)
            ents.append(ent)
        tokens.append(nxt)
        finished = bool(done.all())
        if lockstep:
            finished = not distributed.any_flag(not finished, prompt_ids.device)
        if finished or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
        out = model(
            input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True, **{cache_arg: cache}
        )
        logits, cache, next_pos = out.logits[:, -1, :], getattr(out, cache_arg), next_pos + 1
    if row_seeds is None:
        return torch.stack(tokens, dim=1), None, None
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1), torch.stack(ents, dim=1)


_eager_only: weakref.WeakSet = weakref.WeakSet()  # models whose static step failed under gspo.decode=auto


def resolve_decode(decode: str, model: PreTrainedModel) -> str:
    """gspo.decode as it applies to `model`: auto is static on CUDA when the static path supports the model (every
    layer full attention, weights not sharded) and its compiled step has not failed on it; eager otherwise."""
    if decode != "auto":
        return decode
    if (
        next(model.parameters()).device.type != "cuda"
        or distributed.is_sharded(model)
        or model in _eager_only
        or not static_decode.supported(model)
    ):
        return "eager"
    return "static"


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_length: int = 512,
    do_sample: bool = True,
    batch_size: int = 0,
    row_seeds: torch.Tensor | None = None,
    decode: str = "auto",
) -> Rollout:
    """`group_size` completions for each prompt, groups contiguous; greedy when do_sample is False.

    row_seeds (n_prompts * group_size,) fixes each completion's randomness; without them seeds are drawn from
    torch's global generator. decode is gspo.decode (`resolve_decode`).
    """
    device = next(model.parameters()).device
    n_rows = len(prompts) * group_size
    if do_sample and row_seeds is None:
        row_seeds = torch.randint(0, 2**62, (n_rows,), dtype=torch.int64)
    eos = eos_token_ids(tokenizer, model)
    mode = resolve_decode(decode, model)
    was_training = model.training
    model.eval()
    chunks, logps, ents = [], [], []
    step = batch_size or n_rows
    for i in range(0, n_rows, step):
        j = min(i + step, n_rows)  # completion rows i .. j-1; a chunk may start or end inside a group
        first, last = i // group_size, (j - 1) // group_size
        ids, attn = encode_prompts(tokenizer, prompts[first : last + 1], max_prompt_length, device)
        rows = torch.arange(i, j, device=device) // group_size - first
        args = (
            model,
            ids,
            attn,
            max_new_tokens,
            eos,
            tokenizer.pad_token_id,
            temperature,
            top_p,
            row_seeds[i:j].to(device) if row_seeds is not None and do_sample else None,
        )
        if mode == "static":
            try:
                out = sample_static(*args, rows=rows)
            except StaticDecodeUnavailable as e:
                if decode != "auto":
                    raise
                log.warning("gspo.decode=auto: %s; this model decodes eagerly from now on", e)
                _eager_only.add(model)
                mode = "eager"
        if mode == "eager":
            out = sample(*args, rows=rows, lockstep=distributed.is_sharded(model))
        chunks.append((ids[rows], attn[rows], out[0]))
        if out[1] is not None and out[2] is not None:
            logps.append(out[1])
            ents.append(out[2])
    model.train(was_training)
    prompt_ids = _cat_left([c[0] for c in chunks], tokenizer.pad_token_id)
    prompt_mask = _cat_left([c[1] for c in chunks], 0)
    comp = _cat_right([c[2] for c in chunks], tokenizer.pad_token_id)
    mask, truncated = completion_mask(comp, eos)
    comp = torch.where(mask.bool(), comp, torch.full_like(comp, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
    logp = entropy = None
    if do_sample:
        logp = _cat_right(logps, 0.0) * mask
        entropy = _cat_right(ents, 0.0) * mask
    return Rollout(prompt_ids, prompt_mask, comp, mask, truncated, texts, logp, entropy)


def _cat_left(ts: list[torch.Tensor], pad: float) -> torch.Tensor:
    width = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=pad) for t in ts])


def _cat_right(ts: list[torch.Tensor], pad: float) -> torch.Tensor:
    width = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in ts])


def token_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t) of the completion tokens, (B, T); and the per-token entropy when asked.

    Logits are divided by the sampling temperature so the ratio compares the distributions that were sampled.
    Only completion positions are materialised in float32, which keeps memory at B * T * V, not B * (P+T) * V.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask, completion_mask], dim=1)
    # Positions follow the real tokens so left padding does not shift them.
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, -T - 1 : -1, :].float() / temperature  # (B, T, V): logits at t predict token t
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
