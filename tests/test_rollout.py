import pytest
import torch
from transformers import AutoModelForCausalLM

from gspo.models import load_tokenizer
from gspo.rollout import completion_mask, encode_prompts, eos_token_ids, generate, sample, token_logprobs
from gspo.sampling import gumbel_noise
from gspo.tiny import save_tiny

PROMPTS = [f"{a}+{b}=" for a in range(3, 15) for b in (4, 11)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return AutoModelForCausalLM.from_pretrained(d).eval(), load_tokenizer(d)


def test_greedy_decoding_matches_transformers_generate(tiny):
    model, tok = tiny
    ours = generate(model, tok, PROMPTS, 1, 6, do_sample=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(
        **enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    assert ours.texts == tok.batch_decode(ref[:, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_sampling_does_not_depend_on_batch_composition(tiny):
    model, tok = tiny
    seeds = torch.arange(len(PROMPTS) * 4) + 12345
    whole = generate(model, tok, PROMPTS, 4, 6, row_seeds=seeds)
    first = generate(model, tok, PROMPTS[:9], 4, 6, row_seeds=seeds[:36])
    rest = generate(model, tok, PROMPTS[9:], 4, 6, row_seeds=seeds[36:])
    assert whole.texts == first.texts + rest.texts
    chunked = generate(model, tok, PROMPTS, 4, 6, row_seeds=seeds, batch_size=6)  # chunks that split groups
    assert torch.equal(chunked.completion_ids, whole.completion_ids)
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids)
    other = generate(model, tok, PROMPTS, 4, 6, row_seeds=seeds + 1)
    assert other.texts != whole.texts


def test_prefilling_each_prompt_once_equals_prefilling_every_row(tiny):
    model, tok = tiny
    G = 4
    seeds = torch.arange(len(PROMPTS) * G) + 99
    eos = eos_token_ids(tok, model)
    ids, attn = encode_prompts(tok, PROMPTS, 64, "cpu")
    rows = torch.arange(len(PROMPTS)).repeat_interleave(G)
    once = sample(model, ids, attn, 6, eos, tok.pad_token_id, 0.7, 0.9, seeds, rows=rows)
    every = sample(model, ids[rows], attn[rows], 6, eos, tok.pad_token_id, 0.7, 0.9, seeds)
    assert torch.equal(once[0], every[0])
    assert (once[1] - every[1]).abs().max() <= 1e-6 and (once[2] - every[2]).abs().max() <= 1e-5
    assert len(set(map(tuple, once[0].tolist()))) > len(PROMPTS)  # the copies of a prompt sample apart
    assert not any(x.is_inference() for x in once)  # decoded under inference_mode, handed out trainable


def test_gumbel_argmax_draws_from_the_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 0.0])
    n = 200_000
    draws = (logits + gumbel_noise(torch.arange(n), 7, 5)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = logits.double().softmax(-1)
    # Five binomial standard errors per cell.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)


def test_sampler_log_probs_equal_a_fresh_forward(tiny):
    model, tok = tiny
    roll = generate(model, tok, PROMPTS, 2, 6, temperature=0.7, row_seeds=torch.arange(len(PROMPTS) * 2))
    with torch.no_grad():
        logp, ent = token_logprobs(
            model,
            roll.prompt_ids,
            roll.prompt_mask,
            roll.completion_ids,
            roll.completion_mask,
            temperature=0.7,
            with_entropy=True,
        )
    m = roll.completion_mask.bool()
    assert torch.allclose(roll.logp[m], logp[m], atol=1e-5)
    assert torch.allclose(roll.entropy[m], ent[m], atol=1e-5)


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, truncated = completion_mask(ids, {1})
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_decode_auto_is_eager_on_the_cpu_and_explicit_choices_stand(tiny):
    from gspo.config import load_config
    from gspo.rollout import resolve_decode

    model, _ = tiny
    assert load_config(None, []).gspo.decode == "auto"
    assert resolve_decode("auto", model) == "eager"  # the static path is for CUDA graphs
    assert resolve_decode("static", model) == "static" and resolve_decode("eager", model) == "eager"


@pytest.mark.slow
def test_evaluation_and_the_held_out_reward_decode_as_gspo_decode_says(tmp_path):
    """Both generate through gspo.decode: static compiles its step (on the CPU too) and, in fp32, scores exactly
    what the eager decoder scores."""
    from torch._dynamo.utils import counters

    from gspo.arithmetic import test_set
    from gspo.config import load_config
    from gspo.evaluate import evaluate_task
    from gspo.scoring import greedy_reward

    d = save_tiny(tmp_path / "m", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(d).eval(), load_tokenizer(d)
    examples = test_set(6, 0, 20, "+-")
    scores = {}
    for decode in ("eager", "static"):
        cfg = load_config(
            None,
            [
                f"gspo.decode={decode}",
                "gspo.max_new_tokens=20",
                "eval.max_new_tokens=20",
                "eval.limit=6",
                "train.threads=1",
                "train.device=cpu",
            ],
        )
        graphs = counters["stats"]["unique_graphs"]
        held_out = greedy_reward(model, tok, examples, cfg)
        task = evaluate_task(d, "arithmetic", cfg, predictions_path=tmp_path / f"{decode}.jsonl")
        scores[decode] = (held_out, task["score"], (tmp_path / f"{decode}.jsonl").read_text())
        assert (counters["stats"]["unique_graphs"] > graphs) == (decode == "static")
    assert scores["eager"] == scores["static"]
