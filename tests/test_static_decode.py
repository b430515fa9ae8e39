import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gspo.models import load_tokenizer
from gspo.rollout import encode_prompts, sample
from gspo.static_decode import CHECK_EVERY, StaticDecodeUnavailable, _pools, length_bucket, row_bucket, sample_static
from gspo.tiny import build_model, save_tiny

# Prompts of different lengths, so the batch is left-padded; each is continued by 3 rows.
PROMPTS = ["3+4=", "What is the answer? 12-5=", "7*8=", "Question: 9+11= Answer:"]
T = 40
BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode_speed.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    d = save_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(d).eval(), load_tokenizer(d)
    ids, attn = encode_prompts(tok, PROMPTS, 64, "cpu")
    return model, tok, ids, attn, torch.arange(len(PROMPTS)).repeat_interleave(3)


def assert_same(eager, static):
    assert torch.equal(eager[0], static[0])
    for e, s in zip(eager[1:], static[1:]):
        assert (e is None) == (s is None)
        if e is not None:
            assert (e - s).abs().max() <= 1e-5
    assert not any(x is not None and x.is_inference() for x in static)


@pytest.mark.parametrize("how", ["greedy", "sample", "sample_top_p"])
def test_static_cache_decodes_what_the_eager_decoder_does(tiny, how):
    model, tok, ids, attn, rows = tiny
    seeds = None if how == "greedy" else torch.arange(len(rows)) + 5
    temperature, top_p = (0.7, 0.9) if how == "sample_top_p" else (1.0, 1.0)

    def both(eos, n=T):
        args = (model, ids, attn, n, eos, tok.pad_token_id, temperature, top_p, seeds)
        eager, static = sample(*args, rows=rows), sample_static(*args, rows=rows, compile=False)
        assert_same(eager, static)
        return eager[0]

    free = both({model.config.vocab_size})  # an EOS that cannot be drawn: every row runs T tokens
    assert free.shape == (len(rows), T)
    # EOS = the token row 0 drew at step 5: some rows stop there or earlier, and are padded after.
    out = both({int(free[0, 5])})
    assert (out[0, 6:] == tok.pad_token_id).all()
    # EOS = every row's token at step 24: all rows finish by then, the eager decoder stops early, and the
    # static one, which only looks every CHECK_EVERY tokens, must return the same width.
    out = both(set(free[:, 24].tolist()))
    assert out.shape[1] <= 25
    both(set(free[:, 3].tolist()), n=6)  # shorter than one check interval
    both({int(free[0, 0])}, n=1)  # the prefill's token only


def test_cache_is_reused_across_calls_with_other_prompts(tiny):
    model, tok, ids, attn, rows = tiny
    seeds = torch.arange(len(rows))
    eos = {model.config.vocab_size}
    other_ids, other_attn = encode_prompts(tok, ["1+1=", "20-3=", "5*5=", "8+9="], 64, "cpu")  # narrower
    for p_ids, p_attn in [(ids, attn), (other_ids, other_attn), (ids, attn)]:
        args = (model, p_ids, p_attn, 12, eos, tok.pad_token_id, 1.0, 1.0, seeds)
        assert_same(sample(*args, rows=rows), sample_static(*args, rows=rows, compile=False))
    assert len(_pools[model]) == 1  # both prompt widths round up to one cache length


def test_batch_sizes_of_one_bucket_share_a_cache_and_decode_what_the_eager_decoder_does(tiny):
    model, tok, ids, attn, _ = tiny
    eos = {model.config.vocab_size}
    key = (length_bucket(ids.shape[1] + 20), torch.float32, torch.device("cpu"))
    before = set(_pools[model][key].caches) if key in _pools.get(model, {}) else set()
    for n in (9, 13, 16):  # all in the 16-row bucket: 7, 3 and no idle slots
        rows = torch.arange(n) % len(PROMPTS)
        args = (model, ids, attn, 20, eos, tok.pad_token_id, 1.0, 1.0, torch.arange(n) + 100)
        assert_same(sample(*args, rows=rows), sample_static(*args, rows=rows, compile=False))
    assert set(_pools[model][key].caches) - before == {row_bucket(9)} - before and row_bucket(9) == 16


def test_finished_rows_leave_the_batch_and_the_tokens_stay_the_eager_ones(tiny):
    """48 rows (the 64-row bucket). EOS is the set of the free run's most frequent early tokens, grown until at
    most 12 rows go through the first CHECK_EVERY tokens without one: at that check they move to the 16-row bucket."""
    model, tok, ids, attn, _ = tiny
    rows = torch.arange(48) % len(PROMPTS)
    seeds = torch.arange(48) + 7
    n = 3 * CHECK_EVERY

    def args(eos):
        return (model, ids, attn, n, eos, tok.pad_token_id, 1.0, 1.0, seeds)

    free = sample(*args({model.config.vocab_size}), rows=rows)[0]
    early = free[:, :CHECK_EVERY]
    eos: set[int] = set()
    for t in torch.bincount(early.flatten()).argsort(descending=True).tolist():
        eos.add(t)
        alive = int((~torch.isin(early, torch.tensor(sorted(eos)))).all(1).sum())
        if alive <= 12:
            break
    assert alive > 0
    eager, static = sample(*args(eos), rows=rows), sample_static(*args(eos), rows=rows, compile=False)
    assert_same(eager, static)
    assert eager[0].shape[1] > CHECK_EVERY  # decoding went on after the move
    pool = _pools[model][(length_bucket(ids.shape[1] + n), torch.float32, torch.device("cpu"))]
    assert {64, 16} <= set(pool.caches)
    # Smaller buckets are views of the largest one's allocation: no memory of their own.
    big, small = pool.caches[64].layers[0].keys, pool.caches[16].layers[0].keys
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()


def test_sliding_window_models_are_refused_with_the_config_field():
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(2, 64, (2, 5))
    with pytest.raises(StaticDecodeUnavailable, match=r"gspo\.decode"):
        sample_static(model, ids, torch.ones_like(ids), 4, {1}, 0, compile=False)


@pytest.mark.slow
def test_compiled_step_decodes_what_the_eager_decoder_does_and_follows_weight_updates():
    """torch.compile on the CPU (inductor, no CUDA graphs): about two minutes on 2 cores, most of it compiling."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    model = build_model(64, seed=0, hidden=32, layers=1, heads=2).eval()
    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0

    def args(n, eos=frozenset({64})):
        return (model, ids, attn, CHECK_EVERY + 4, eos, 0, 1.0, 1.0, torch.arange(n))

    def rows(n):
        return torch.arange(n) % 3

    graphs = counters["stats"]["unique_graphs"]
    before = sample_static(*args(3), rows=rows(3))
    assert_same(sample(*args(3), rows=rows(3)), before)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    # Another batch size in the same bucket replays the same compiled step.
    assert_same(sample(*args(6), rows=rows(6)), sample_static(*args(6), rows=rows(6)))
    assert counters["stats"]["unique_graphs"] == graphs + 1
    with torch.no_grad():  # what an optimizer step does: new values in the same tensors
        for p in model.parameters():
            p.mul_(1.5)
    after = sample_static(*args(3), rows=rows(3))
    assert_same(sample(*args(3), rows=rows(3)), after)
    assert not torch.equal(before[0], after[0])
    # 12 rows (the 16-row bucket), rows 0..8 drawing EOS in their first two tokens: at the check the other three
    # move to the 8-row bucket. Two more steps compiled: the 16-row one, and the 8-row one again, because its
    # cache is now a view of the larger allocation.
    free = sample(*args(12), rows=rows(12))[0]
    eos = set(free[:9, :2].flatten().tolist()) - set(free[9:, :CHECK_EVERY].flatten().tolist())
    eager, static = sample(*args(12, eos), rows=rows(12)), sample_static(*args(12, eos), rows=rows(12))
    assert_same(eager, static)
    assert eager[0].shape[1] > CHECK_EVERY and counters["stats"]["unique_graphs"] == graphs + 3


@pytest.mark.slow  # the bench script in a subprocess
def test_decode_speed_bench_smoke(tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--rows", "4,12", "--eager-tokens", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=") and lines[-2].startswith("| tiny | 12 |")
    data = json.loads(out.read_text())
    by_rows = data["models"]["tiny"]["rows"]
    assert set(by_rows) == {"4", "12"}
    for r in by_rows.values():
        assert r["static_tokens_per_s"] > 0 and r["eager_tokens_per_s"] > 0 and r["eager_tokens"] == 20
    # fp32 on the CPU: the two decoders agree exactly, before and after the weights change in place.
    for a in [r["static_vs_eager"] for r in by_rows.values()] + [
        data["exactness_fp32"]["before_update"],
        data["exactness_fp32"]["after_update"],
    ]:
        assert a["identical_fraction"] == 1.0 and a["max_abs_logp_diff_before_divergence"] <= 1e-5
    assert data["exactness_fp32"]["static_changed_with_weights"]


def test_decode_attention_groups_query_heads_instead_of_copying_the_cache(tiny):
    """While decoding, sdpa models attend with `_grouped_sdpa` (one query token: a key/value head's query heads
    attend to it together), which equals transformers' sdpa on copied key/value heads; afterwards sdpa is back."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from gspo.static_decode import GROUPED, _grouped_sdpa

    model, tok, ids, attn, _rows = tiny
    attention = model.model.layers[0].self_attn
    assert attention.num_key_value_groups > 1
    seen = []
    hook = attention.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    try:
        sample_static(model, ids, attn, 3, {model.config.vocab_size}, tok.pad_token_id, compile=False)
    finally:
        hook.remove()
    assert seen[1:] == [GROUPED, GROUPED] and model.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((4, 1), (2, 9), (2, 9)))
    mask = torch.rand(3, 1, 1, 9, generator=g) > 0.3
    ours, _ = _grouped_sdpa(attention, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-6)
    # More than one query token is transformers' own sdpa.
    q2 = torch.randn(3, 4, 2, 16, generator=g)
    assert torch.equal(
        _grouped_sdpa(attention, q2, k, v, None, scaling=0.25)[0],
        sdpa_attention_forward(attention, q2, k, v, None, scaling=0.25)[0],
    )
