"""The offline tiny model: a small Qwen2-architecture model and a BPE tokenizer trained on local text.

Both are deterministic from a seed and saved with `save_pretrained`, so every stage loads them exactly as it
would load a hub model. No network is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gspo.arithmetic import problem_space
from gspo.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|bos|>"]

# A little English so the tokenizer has ordinary words besides the arithmetic; the model learns its task
# from the warm start, not from this text.
_TEXT = """What is the answer? The answer is a number. Solve the problem step by step and give the final answer.
Question: Answer: Let us think. The result of adding, subtracting or multiplying two numbers is a number.
def add(a, b): return a + b
"""


def _corpus() -> list[str]:
    lines = [f"{a}{op}{b}={eval_op(a, op, b)}" for a, op, b in problem_space(30, "+-*")]
    return lines + _TEXT.splitlines()


def eval_op(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def build_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits one token each, so every number is spelled the same way and arithmetic stays learnable.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        bos_token="<|bos|>",
        padding_side="left",
        model_max_length=512,
    )


def build_model(vocab_size: int, seed: int = 0, hidden: int = 128, layers: int = 4, heads: int = 4) -> Qwen2ForCausalLM:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        dtype="float32",
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def save_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and tokenizer to out_dir (atomically: built aside, then renamed into place)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    with atomic_dir(out_dir, replace=False) as tmp:  # a concurrent writer's copy is identical
        tok = build_tokenizer()
        model = build_model(len(tok), seed=seed)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir
