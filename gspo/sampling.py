"""Token sampling shared by both decoders (gspo.rollout's eager one and gspo.static_decode's compiled one):
counter-based Gumbel noise, the pick of each row's next token, the prompt prefill."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64 multipliers as signed int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiply; masks turn arithmetic shifts into logical ones)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * _M1
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * _M2
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def gumbel_noise(row_seeds: torch.Tensor, t: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) Gumbel noise that depends only on (row seed, position, token id).

    Sampling is argmax(logits / T + noise): exactly a draw from softmax(logits / T), and a row's draw does not
    depend on which other rows share its batch, so a rollout sharded over ranks equals the unsharded one.
    """
    v = torch.arange(vocab, device=row_seeds.device, dtype=torch.int64)
    x = _mix(_mix(row_seeds * 1_000_003 + t)[:, None] + v[None, :])
    u = ((x >> 11) & ((1 << 53) - 1)).double().add_(0.5).div_(2.0**53)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u)).float()


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p; the rest get -inf."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is already full
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def pick(
    logits: torch.Tensor,
    row_seeds: torch.Tensor | None,
    t: int | torch.Tensor,
    done: torch.Tensor,
    eos: torch.Tensor,
    pad_id: int,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Next token of every row from its last logits (B, V): greedy without row_seeds, else a Gumbel-max draw from
    the tempered (and nucleus-cut) distribution; pad after EOS. Returns (token, log-prob, entropy, done), the
    log-prob and entropy of the tempered distribution before the cut (None when greedy; 0 on a padded row)."""
    logits = logits.float()
    lp = ent = None
    if row_seeds is None:
        nxt = logits.argmax(-1)
    else:
        logits = logits / temperature
        lp_all = torch.log_softmax(logits, dim=-1)  # the policy's, before the nucleus cut
        if top_p < 1.0:
            logits = _top_p_filter(logits, top_p)
        nxt = (logits + gumbel_noise(row_seeds, t, logits.shape[-1])).argmax(-1)
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    if row_seeds is not None:
        # Rows that had finished hold padding: no draw, so nothing to report, whichever rows share the batch.
        lp = torch.where(done, 0.0, lp_all.gather(1, nxt[:, None]).squeeze(1))
        ent = torch.where(done, 0.0, -(lp_all.exp() * lp_all).sum(-1))
    return nxt, lp, ent, done | (nxt[:, None] == eos[None, :]).any(-1)


def _cache_arg(model: PreTrainedModel) -> str:
    """transformers 5 renamed the KV-cache argument and output field from past_key_values to cache."""
    base = getattr(model, "get_base_model", lambda: model)()  # PEFT wraps forward in **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


# A decode's (B, T) completion ids and, when sampled, the (B, T) log-probs and entropies of its draws.
Decoded = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def plain(out: Decoded) -> Decoded:
    """Ordinary copies of inference tensors, which cannot be saved for backward (the caller may train on them)."""
    ids, logp, ent = out
    return ids.clone(), None if logp is None else logp.clone(), None if ent is None else ent.clone()


def prefill(
    model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, Any, torch.Tensor, str]:
    """One forward over left-padded prompts: (last logits (P, V), KV cache, last position (P, 1), cache field name)."""
    pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache_arg = _cache_arg(model)
    return out.logits[:, -1, :], getattr(out, cache_arg), pos[:, -1:], cache_arg
