from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rewards
from gspo.data import load_examples
from rewards.choice import encode_pair, extract_choice, loglikelihoods, predict, score_choices

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag.jsonl"


@pytest.fixture(scope="module")
def examples():
    return load_examples("hellaswag", path=FIXTURE, split="validation")


@pytest.fixture(scope="module")
def tokenizer(examples):
    """A byte-level BPE trained on the fixture itself, so words become multi-character tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([e.meta["context"] + " " + " ".join(e.meta["endings"]) for e in examples], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_model(arch: str, vocab_size: int, max_positions: int = 256):
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=max_positions,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def naive_loglikelihood(model, tokenizer, context: str, ending: str) -> float:
    """One unpadded forward per ending; token t of the continuation is predicted at the position before it."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(context + " " + ending)["input_ids"][len(ctx) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0], -1)
    return sum(logp[len(ctx) + t - 1, token].item() for t, token in enumerate(cont))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_score_choices_equals_naive_per_ending_loop(arch, examples, tokenizer):
    torch.set_num_threads(1)
    model = tiny_model(arch, len(tokenizer)).double()  # float64, so the two paths agree far below 1e-5
    model.eval()
    naive = [
        [naive_loglikelihood(model, tokenizer, e.meta["context"], end) for end in e.meta["endings"]] for e in examples
    ]
    hits = hits_norm = 0
    for e, lls in zip(examples, naive):
        pred = max(range(4), key=lambda j: lls[j])
        pred_norm = max(range(4), key=lambda j: lls[j] / len(e.meta["endings"][j]))
        hits += pred == e.reference
        hits_norm += pred_norm == e.reference
    model.train()  # scoring must switch dropout off itself, and give the mode back
    for batch_size in (1, 3, 8, 24):
        got = score_choices(model, tokenizer, examples, batch_size=batch_size)
        assert model.training
        assert got["n"] == len(examples)
        for p, e, lls in zip(got["predictions"], examples, naive):
            assert p["id"] == e.id and p["label"] == e.reference
            assert p["loglikelihoods"] == pytest.approx(lls, abs=1e-5)
        assert got["acc"] == hits / len(examples)
        assert got["acc_norm"] == hits_norm / len(examples)


def test_float32_model_agrees_too(examples, tokenizer):
    torch.set_num_threads(1)
    model = tiny_model("qwen2", len(tokenizer)).eval()
    got = score_choices(model, tokenizer, examples[:2], batch_size=8)
    for p, e in zip(got["predictions"], examples):
        naive = [naive_loglikelihood(model, tokenizer, e.meta["context"], end) for end in e.meta["endings"]]
        assert p["loglikelihoods"] == pytest.approx(naive, abs=1e-4)


def test_long_context_keeps_its_end(tokenizer, examples):
    torch.set_num_threads(1)
    model = tiny_model("gpt2", len(tokenizer), max_positions=40).double().eval()
    ctx, cont = encode_pair(tokenizer, examples[2].meta["context"], " " + examples[2].meta["endings"][1])
    assert len(ctx) + len(cont) > 41 and len(cont) < 40
    keep = 41 - len(cont)  # the model sees 40 positions; the final token is only a target
    [long] = loglikelihoods(model, [(ctx, cont)])
    [short] = loglikelihoods(model, [(ctx[-keep:], cont)])
    assert long == pytest.approx(short, abs=1e-12)


def test_encode_pair_boundary(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The man", " tunes the strings")
    assert ctx == tokenizer("The man")["input_ids"]
    assert tokenizer.decode(cont) == " tunes the strings"
    # Trailing context spaces travel with the continuation, as in the harness.
    assert encode_pair(tokenizer, "The man ", "tunes") == encode_pair(tokenizer, "The man", " tunes")


def test_acc_norm_divides_by_ending_characters():
    # -4/2 < -7.9/4 picks ending 1 per character; counting the joining space (3 and 5) would pick ending 0.
    assert predict([-4.0, -7.9], ["ab", "abcd"]) == (0, 1)
    assert predict([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: the first


def test_empty_input_and_empty_ending_are_errors(examples, tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match=r"^no examples to score$"):
        score_choices(model, tokenizer, [])
    bad = SimpleNamespace(id="x", reference=0, meta={"context": "c", "endings": ["a", "", "b", "d"]})
    with pytest.raises(ValueError, match=r"^x: an ending is empty"):
        score_choices(model, tokenizer, [bad])


# ---- generative reward -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, index",
    [
        ("B", 1),
        (" B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B) tunes the strings", 1),
        ("Answer: B", 1),
        ("answer: C", 2),
        ("The answer is D.", 3),
        ("The answer is (A)", 0),
        ("I think (C) fits best.", 2),
        ("D\nbecause it is likely", 3),
        ("tunes the strings and begins strumming a song.", 1),
        ("  Tunes the strings and begins strumming a song  ", 1),
        ("(A) and (B) are silly. Answer: D", 3),
        ("Answer: B\nExplanation: (A) is silly.", 1),
    ],
)
def test_extract_choice(completion, index, examples):
    assert extract_choice(completion, examples[1].meta["endings"])[0] == index


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "A man tunes his guitar.",
        "the answer is a song",
        "Either (A) or (B), hard to say",
        "E",
        "Answer: E",
        "Because the man wants music",
        "tunes the strings",
    ],
)
def test_extract_choice_finds_nothing(completion, examples):
    assert extract_choice(completion, examples[1].meta["endings"]) == (None, "")


def test_letters_limited_to_the_number_of_endings():
    assert extract_choice("C", ["x", "y"]) == (None, "")
    assert extract_choice("B", ["x", "y"]) == (1, "leading letter")


def test_reward_registered_and_scored(examples):
    e = examples[1]  # reference 1, letter B
    for name in ("hellaswag", "choice"):
        right = rewards.score(name, "Answer: B", e)
        assert (right.score, right.verdict, right.extracted) == (1.0, "correct", "B")
        assert right.reason == "answer phrase B is the reference"
    wrong = rewards.score("hellaswag", "(C)", e)
    assert (wrong.score, wrong.verdict, wrong.extracted, wrong.reason) == (
        0.0,
        "wrong",
        "C",
        "leading letter C, reference B",
    )
    text = rewards.score("hellaswag", e.meta["endings"][1], e)
    assert (text.score, text.extracted, text.reason) == (1.0, "B", "ending text B is the reference")
    none = rewards.score("hellaswag", "no idea", e)
    assert (none.score, none.verdict, none.extracted) == (0.0, "no_answer", None)
    as_string = SimpleNamespace(reference="3", meta={})  # hub labels are strings; no endings: letters A-D
    assert rewards.score("choice", "D", as_string).score == 1.0
