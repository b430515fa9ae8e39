"""Rollout decoding with a static KV cache and a compiled one-token step (CUDA graphs on the GPU).

`sample_static` has `gspo.rollout.sample`'s signature and returns the same tensors. The eager decoder spends
its time on the host: every token runs Python, builds a mask, grows the cache and launches some thirty kernels
per layer, so a GPU waits on the CPU whatever the model size. Here the prompt is prefilled eagerly exactly as
`sample` does it, its keys and values are copied into a transformers `StaticCache` of fixed shape, and each
later token is one call of a function compiled with `torch.compile(mode="reduce-overhead")`: the model's forward
on that cache plus the sampling (temperature, log-softmax, top-p, Gumbel argmax, EOS bookkeeping), replayed as
one CUDA graph. The host only checks whether every row has finished once every `CHECK_EVERY` tokens; the output
is trimmed afterwards to the width `sample` would have stopped at, so the two return the same tensors.

Per model, the cache and the compiled code are kept for each (rows, cache length, dtype, device) and reused by
later calls: CUDA graphs read the weights and the cache at fixed addresses. Training may change the weights
between calls as long as it updates the parameter tensors in place (optimizer steps, `load_state_dict` without
`assign=True`, PEFT adapters being trained); code that swaps parameter tensors for new ones (merging LoRA into
the base weights, `load_state_dict(assign=True)`, moving the model) leaves the recorded graphs pointing at the
old storage until torch notices and records again, so do that between rollouts, never during one.
"""
from __future__ import annotations

import functools
import weakref

import torch

from gspo.sampling import pick, plain, prefill

CHECK_EVERY = 16  # tokens between host reads of "all rows finished"; each read waits for the GPU to catch up
CACHE_ROUND = 256  # cache lengths are rounded up to this, so prompts of different widths share a compiled step

_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(B, L, dtype, device): StaticCache}


def sample_static(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                  eos_ids: set[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                  row_seeds: torch.Tensor | None = None, rows: torch.Tensor | None = None, compile: bool = True):
    """`gspo.rollout.sample` on a static KV cache; compile=False runs the same step eagerly (for checking it)."""
    return plain(_decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p,
                         row_seeds, rows, compile))


def _step(model, cache, cache_arg: str, tok, pos, attn, row_seeds, t, done, eos, pad_id: int, temperature: float,
          top_p: float):
    """Feed each row's last token (B,) at position pos (B, 1) into the static cache and pick the next one."""
    out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: cache})
    return pick(out.logits[:, -1, :], row_seeds, t, done, eos, pad_id, temperature, top_p)


@functools.cache
def _compiled_step():
    # Made on first use: importing the decoder must not pull in torch.compile's machinery.
    # fullgraph: a graph break would quietly run part of every token eagerly, which is what this path exists to
    # avoid. dynamic=False: one specialised graph per shape, and shapes are few (CACHE_ROUND).
    return torch.compile(_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


def _static_cache(model, B: int, L: int, dtype: torch.dtype, device: torch.device):
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    per_model = _caches.setdefault(model, {})
    key = (B, L, dtype, device)
    if key not in per_model:
        cache = StaticCache(config=model.config, max_cache_len=L)
        if any(type(layer) is not StaticLayer for layer in cache.layers):
            raise ValueError("gspo.decode=static supports models whose every layer attends to the whole sequence "
                             "(no sliding window); use gspo.decode=eager for this model")
        per_model[key] = cache
    return per_model[key]


def _load(cache, prompt_cache, rows: torch.Tensor, P: int) -> None:
    """Copy the prompts' keys and values into slots 0..P-1 of each completion's row; clear the rest."""
    for layer, src in zip(cache.layers, prompt_cache.layers):
        k, v = src.keys[rows], src.values[rows]
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        # In place: the compiled step reads these tensors at the addresses it was recorded with.
        layer.keys[:, :, :P].copy_(k)
        layer.values[:, :, :P].copy_(v)
        layer.keys[:, :, P:].zero_()
        layer.values[:, :, P:].zero_()
        layer.cumulative_length.fill_(P)


@torch.inference_mode()
def _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, row_seeds, rows,
            compile):
    device = prompt_ids.device
    eos = torch.tensor(sorted(eos_ids), device=device)
    # The prefill is sample's own: eager, each distinct prompt once.
    logits, prompt_cache, last_pos, cache_arg = prefill(model, prompt_ids, prompt_mask)
    if rows is None:
        rows = torch.arange(prompt_ids.shape[0], device=device)
    logits, last_pos = logits[rows], last_pos[rows]
    B, P = rows.shape[0], prompt_ids.shape[1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = torch.arange(max_new_tokens, device=device)  # step numbers as tensors: one graph serves every step
    picks = [pick(logits, row_seeds, steps[0], done, eos, pad_id, temperature, top_p)]
    if max_new_tokens > 1:
        L = -(-(P + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
        cache = _static_cache(model, B, L, logits.dtype, device)
        _load(cache, prompt_cache, rows, P)
        del prompt_cache
        # Slots past the current token hold nothing yet, but the causal mask over slots already hides them.
        attn = torch.cat([prompt_mask[rows], prompt_mask.new_ones(B, L - P)], dim=1)
        step = _compiled_step() if compile else _step
        for t in range(1, max_new_tokens):
            if t % CHECK_EVERY == 0 and bool(picks[-1][3].all()):
                break
            tok, _, _, done = picks[-1]
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            try:
                nxt = step(model, cache, cache_arg, tok, last_pos + t, attn, row_seeds, steps[t], done, eos, pad_id,
                           temperature, top_p)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                if not compile:
                    raise
                raise RuntimeError(f"gspo.decode=static: the compiled decode step failed ({type(e).__name__}: {e}); "
                                   "set gspo.decode=eager to decode without torch.compile") from e
            # A CUDA graph writes its outputs to the same memory on every replay: keep copies.
            picks.append(tuple(None if x is None else x.clone() for x in nxt))
    ids = torch.stack([p[0] for p in picks], dim=1)
    # sample stops after the first token at which every row has finished (EOS sampled then or earlier).
    finished = (ids[:, :, None] == eos).any(-1).cummax(dim=1).values.all(dim=0)
    width = int(finished.int().argmax()) + 1 if bool(finished.any()) else ids.shape[1]
    if row_seeds is None:
        return ids[:, :width], None, None
    return (ids[:, :width], torch.stack([p[1] for p in picks], dim=1)[:, :width],
            torch.stack([p[2] for p in picks], dim=1)[:, :width])
