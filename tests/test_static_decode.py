import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gspo.models import load_tokenizer
from gspo.rollout import encode_prompts, sample
from gspo.static_decode import CHECK_EVERY, _caches, sample_static
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
    assert len(_caches[model]) == 1  # both prompt widths round up to one cache length


def test_sliding_window_models_are_refused_with_the_config_field():
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(2, 64, (2, 5))
    with pytest.raises(ValueError, match="gspo.decode"):
        sample_static(model, ids, torch.ones_like(ids), 4, {1}, 0, compile=False)


@pytest.mark.slow
def test_compiled_step_decodes_what_the_eager_decoder_does_and_follows_weight_updates():
    """torch.compile on the CPU (inductor, no CUDA graphs): about a minute on 2 cores, most of it compiling."""
    torch.set_num_threads(1)
    model = build_model(64, seed=0, hidden=32, layers=1, heads=2).eval()
    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0
    args = (model, ids, attn, CHECK_EVERY + 4, {64}, 0, 1.0, 1.0, torch.arange(3))
    before = sample_static(*args)
    assert_same(sample(*args), before)
    with torch.no_grad():  # what an optimizer step does: new values in the same tensors
        for p in model.parameters():
            p.mul_(1.5)
    after = sample_static(*args)
    assert_same(sample(*args), after)
    assert not torch.equal(before[0], after[0])


def test_decode_speed_bench_smoke(tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("ratio=")
    data = json.loads(out.read_text())
    tiny = data["models"]["tiny"]
    assert tiny["static_tokens_per_s"] > 0 and tiny["eager_tokens_per_s"] > 0
    # fp32 on the CPU: the two decoders agree exactly, before and after the weights change in place.
    for a in (tiny["static_vs_eager"], data["exactness_fp32"]["before_update"], data["exactness_fp32"]["after_update"]):
        assert a["identical_fraction"] == 1.0 and a["max_abs_logp_diff_before_divergence"] <= 1e-5
    assert data["exactness_fp32"]["static_changed_with_weights"]
