"""Rollout decoding with a static KV cache and a compiled one-token step (CUDA graphs on the GPU).

`sample_static` has `gspo.rollout.sample`'s signature and returns the same tensors. The eager decoder spends
its time on the host: every token runs Python, builds a mask, grows the cache and launches some thirty kernels
per layer, so a GPU waits on the CPU whatever the model size. Here the prompt is prefilled eagerly exactly as
`sample` does it, its keys and values are copied into a transformers `StaticCache` of fixed shape, and each
later token is one call of a function compiled with `torch.compile(mode="reduce-overhead")`: the model's forward
on that cache plus the sampling (temperature, log-softmax, top-p, Gumbel argmax, EOS bookkeeping), replayed as
one CUDA graph. The output is trimmed afterwards to the width `sample` would have stopped at, so the two return
the same tensors.

Shapes come in buckets, so a training run compiles a handful of steps and replays them for every later batch:
rows are rounded up to a power of two (at least MIN_ROWS; the extra slots decode nothing) and the cache length
to a multiple of CACHE_ROUND. Every CHECK_EVERY tokens the host reads how many rows are still decoding; once
they fit a bucket half the size or less, they are moved to the front of the cache and decoding goes on at that
smaller bucket, so rows that have finished stop costing cache reads and compute. All row buckets of one cache
length share one allocation (the smaller ones are views of the largest), so moving down costs no memory.

Per model, the caches and the compiled steps are kept and reused by later calls: CUDA graphs read the weights
and the cache at fixed addresses. Training may change the weights between calls as long as it updates the
parameter tensors in place (optimizer steps, `load_state_dict` without `assign=True`, PEFT adapters being
trained); code that swaps parameter tensors for new ones (merging LoRA into the base weights,
`load_state_dict(assign=True)`, moving the model) leaves the recorded graphs pointing at the old storage until
torch notices and records again, so do that between rollouts, never during one.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from gspo.sampling import Decoded, pick, plain, prefill

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A KV cache (transformers' StaticCache, or the prefill's DynamicCache). transformers types a cache's layers as a
# union with kinds a full-attention model never has (`supported` checks that), so caches are not checked here.
KVCache = Any

CHECK_EVERY = 16  # tokens between host reads of how many rows still decode; each read waits for the GPU
CACHE_ROUND = 256  # cache lengths are rounded up to this, so prompts of different widths share a compiled step
MIN_ROWS = 8  # the smallest row bucket: below it a step costs the same (the weights' read dominates)
GROUPED = "gspo_grouped_sdpa"  # the attention the decode step runs when the model's is sdpa (`_grouped_sdpa`)

_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(L, dtype, device): _Pool}


class StaticDecodeUnavailable(RuntimeError):
    """This model cannot decode on the static path (gspo.decode=auto then decodes eagerly)."""


def row_bucket(n: int) -> int:
    return max(MIN_ROWS, 1 << (n - 1).bit_length())


def length_bucket(n: int) -> int:
    return -(-n // CACHE_ROUND) * CACHE_ROUND


def supported(model: PreTrainedModel) -> bool:
    """Whether every layer of the model attends to the whole sequence (a StaticCache of plain layers)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in StaticCache(config=model.config, max_cache_len=1).layers)


def sample_static(
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
    compile: bool = True,
) -> Decoded:
    """`gspo.rollout.sample` on a static KV cache; compile=False runs the same step eagerly (for checking it)."""
    if not supported(model):
        raise StaticDecodeUnavailable(
            "gspo.decode=static supports models whose every layer attends to the whole "
            "sequence (no sliding window); use gspo.decode=eager for this model"
        )
    with _grouped_attention(model):
        return plain(
            _decode(
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
                compile,
            )
        )


def _step(
    model: PreTrainedModel,
    cache: KVCache,
    cache_arg: str,
    tok: torch.Tensor,
    pos: torch.Tensor,
    attn: torch.Tensor,
    row_seeds: torch.Tensor | None,
    t: torch.Tensor,
    done: torch.Tensor,
    eos: torch.Tensor,
    pad_id: int,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Feed each row's last token (B,) at position pos (B, 1) into the static cache and pick the next one."""
    out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: cache})
    return pick(out.logits[:, -1, :], row_seeds, t, done, eos, pad_id, temperature, top_p)


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sdpa for one new token per row, with the query heads that share a key/value head attending to it together.

    transformers' sdpa does this outside torch.compile only; inside a compiled step it copies every key/value head
    once per query head (repeat_kv) and attends on the copies: for Qwen2.5-7B (7 query heads per key/value head)
    seven copies of the whole cache written and read per token, more bytes than the weights at a large batch.
    Anything else (several query tokens, a position bias, a softcap) goes to transformers' own sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kw.get("position_bias") is not None or kw.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    B, H, _, D = query.shape
    # (B, H, 1, D) -> (B, H_kv, groups, D): a group's query heads become that key/value head's queries; the mask,
    # (B, 1, 1, L), is the same for all of them.
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, H // groups, groups, D), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


@functools.cache
def _register_grouped() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED, _grouped_sdpa)
    AttentionMaskInterface.register(GROUPED, sdpa_mask)


@contextmanager
def _grouped_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention switched from sdpa to `_grouped_sdpa` while decoding; any other stays as it is."""
    if model.config._attn_implementation != "sdpa":
        yield
        return
    _register_grouped()
    model.set_attn_implementation(GROUPED)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _compiled_step() -> Callable[..., Any]:
    # A fresh code object per shape: dynamo keeps its compiled entries on the code object and tries them in turn
    # on every call, so one entry each keeps the per-token guard check short and clear of the recompile limit.
    # fullgraph: a graph break would quietly run part of every token eagerly, which is what this path exists to
    # avoid. dynamic=False: one specialised graph per bucket.
    fn = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
    return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)


class _Pool:
    """The static caches of one cache length for every row bucket, views of one allocation (the largest bucket's),
    and their compiled steps."""

    def __init__(self, model: PreTrainedModel, L: int) -> None:
        self.config, self.L = model.config, L
        self.caches: dict = {}  # rows -> StaticCache
        self.steps: dict = {}  # rows -> compiled step

    def cache(self, rows: int, like: KVCache) -> KVCache:
        """The cache for `rows` slots; `like` is a cache of the same model (any batch) whose layers give the
        head counts, sizes, dtype and device."""
        from transformers import StaticCache

        if rows in self.caches:
            return self.caches[rows]
        largest = max(self.caches, default=0)
        if rows > largest:
            # A larger bucket: a new allocation, and every smaller bucket becomes a view of it (recompiled once).
            big: KVCache = StaticCache(config=self.config, max_cache_len=self.L)
            for layer, src in zip(big.layers, like.layers):
                layer.lazy_initialization(
                    src.keys[:1].expand(rows, -1, -1, -1), src.values[:1].expand(rows, -1, -1, -1)
                )
            old, self.caches, self.steps = list(self.caches), {rows: big}, {}
            for r in old:
                self._view(r, like)
        else:
            self._view(rows, like)
        return self.caches[rows]

    def _view(self, rows: int, like: KVCache) -> None:
        from transformers import StaticCache

        big = self.caches[max(self.caches)]
        cache: KVCache = StaticCache(config=self.config, max_cache_len=self.L)
        for layer, src, whole in zip(cache.layers, like.layers, big.layers):
            layer.lazy_initialization(src.keys[:0], src.values[:0])  # sizes and device, nothing allocated
            # The first `rows` slots of the largest bucket; one position counter for them all.
            layer.keys, layer.values = whole.keys[:rows], whole.values[:rows]
            layer.cumulative_length = whole.cumulative_length
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
        self.caches[rows] = cache

    def step(self, rows: int) -> Callable[..., Any]:
        if rows not in self.steps:
            self.steps[rows] = _compiled_step()
        return self.steps[rows]


def _pool(model: PreTrainedModel, L: int, dtype: torch.dtype, device: torch.device) -> _Pool:
    per_model = _pools.setdefault(model, {})
    key = (L, dtype, device)
    if key not in per_model:
        per_model[key] = _Pool(model, L)
    return per_model[key]


def _load(cache: KVCache, prompt_cache: KVCache, src: torch.Tensor, P: int) -> None:
    """Copy the prompts' keys and values into slots 0..P-1 of each slot's row (src: the prompt of each slot)."""
    for layer, prompt in zip(cache.layers, prompt_cache.layers):
        # In place: the compiled step reads these tensors at the addresses it was recorded with.
        layer.keys[:, :, :P].copy_(prompt.keys[src])
        layer.values[:, :, :P].copy_(prompt.values[src])
        layer.keys[:, :, P:].zero_()
        layer.values[:, :, P:].zero_()
        layer.cumulative_length.fill_(P)


def _move(cache: KVCache, to: KVCache, keep: torch.Tensor) -> None:
    """Slots `keep` of `cache` into slots 0..len(keep)-1 of `to` (a view of the same allocation)."""
    for layer, dst in zip(cache.layers, to.layers):
        dst.keys.copy_(layer.keys.index_select(0, keep))  # index_select copies first: the two overlap
        dst.values.copy_(layer.values.index_select(0, keep))


@torch.inference_mode()
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
    compile: bool,
) -> Decoded:
    device = prompt_ids.device
    eos = torch.tensor(sorted(eos_ids), device=device)
    # The prefill is sample's own: eager, each distinct prompt once.
    logits, prompt_cache, last_pos, cache_arg = prefill(model, prompt_ids, prompt_mask)
    if rows is None:
        rows = torch.arange(prompt_ids.shape[0], device=device)
    B, P = rows.shape[0], prompt_ids.shape[1]
    b = row_bucket(B)
    # Slot i decodes row slots[i]; slots past the real rows continue row 0's prompt, start finished and write
    # to row B, a scratch row dropped at the end.
    src = torch.cat([rows, rows[:1].expand(b - B)])
    slots = torch.cat([torch.arange(B, device=device), torch.full((b - B,), B, device=device)])
    seeds = None if row_seeds is None else torch.cat([row_seeds, row_seeds.new_zeros(b - B)])
    done = torch.arange(b, device=device) >= B
    steps = torch.arange(max_new_tokens, device=device)  # step numbers as tensors: one graph serves every step
    tok, lp, ent, done = pick(logits[src], seeds, steps[0], done, eos, pad_id, temperature, top_p)
    # (slot -> row, the picks (token, log-prob, entropy) made with that assignment)
    segments: list[tuple[torch.Tensor, list[tuple]]] = [(slots, [(tok, lp, ent)])]
    if max_new_tokens > 1:
        pool = _pool(model, length_bucket(P + max_new_tokens), logits.dtype, device)
        cache = pool.cache(b, prompt_cache)
        _load(cache, prompt_cache, src, P)
        del prompt_cache
        # Slots past the current token hold nothing yet, but the causal mask over slots already hides them.
        attn = torch.cat([prompt_mask[src], prompt_mask.new_ones(b, pool.L - P)], dim=1)
        pos = last_pos[src]
        for t in range(1, max_new_tokens):
            if t % CHECK_EVERY == 0:
                alive = int((~done).sum())
                if alive == 0:
                    break
                if row_bucket(alive) < b:
                    keep = (~done).nonzero().squeeze(1)
                    b = row_bucket(alive)
                    keep = torch.cat([keep, keep[:1].expand(b - alive)])
                    smaller = pool.cache(b, cache)
                    _move(cache, smaller, keep)
                    cache = smaller
                    slots = torch.where(torch.arange(b, device=device) < alive, slots[keep], B)
                    tok, pos, attn = tok[keep], pos[keep], attn[keep]
                    seeds = None if seeds is None else seeds[keep]
                    done = torch.arange(b, device=device) >= alive
                    segments.append((slots, []))
            step = pool.step(b) if compile else _step
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            try:
                nxt = step(
                    model, cache, cache_arg, tok, pos + t, attn, seeds, steps[t], done, eos, pad_id, temperature, top_p
                )
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                if not compile:
                    raise
                raise StaticDecodeUnavailable(
                    f"gspo.decode=static: the compiled decode step failed ({type(e).__name__}: {e}); "
                    "set gspo.decode=eager to decode without torch.compile"
                ) from e
            # A CUDA graph writes its outputs to the same memory on every replay: keep copies.
            tok, done = nxt[0].clone(), nxt[3].clone()
            lp, ent = (None if x is None else x.clone() for x in nxt[1:3])
            segments[-1][1].append((tok, lp, ent))
    return _assemble(segments, B, pad_id, eos, row_seeds is not None)


def _assemble(
    segments: list[tuple[torch.Tensor, list[tuple]]], B: int, pad_id: int, eos: torch.Tensor, sampled: bool
) -> Decoded:
    """(B, T) tokens, log-probs and entropies from the segments' picks, trimmed to where `sample` stops."""
    T = sum(len(picks) for _, picks in segments)
    device = segments[0][0].device
    ids = torch.full((B + 1, T), pad_id, dtype=torch.long, device=device)
    lps, ents = torch.zeros(B + 1, T, device=device), torch.zeros(B + 1, T, device=device)
    col = 0
    for slots, picks in segments:
        if picks:
            cols = slice(col, col + len(picks))
            ids[slots, cols] = torch.stack([p[0] for p in picks], dim=1)
            if sampled:
                lps[slots, cols] = torch.stack([p[1] for p in picks], dim=1)
                ents[slots, cols] = torch.stack([p[2] for p in picks], dim=1)
            col += len(picks)
    ids = ids[:B]
    # sample stops after the first token at which every row has finished (EOS sampled then or earlier).
    finished = (ids[:, :, None] == eos).any(-1).cummax(dim=1).values.all(dim=0)
    width = int(finished.int().argmax()) + 1 if bool(finished.any()) else T
    if not sampled:
        return ids[:, :width], None, None
    return ids[:, :width], lps[:B, :width], ents[:B, :width]
