"""HellaSwag: log-likelihood scoring of the endings (acc, acc_norm) and a generative multiple-choice reward.

Scoring follows lm-evaluation-harness: each ending is scored as the continuation " " + ending of the
preprocessed context; acc takes the ending with the highest summed log-likelihood, acc_norm divides it by
the ending's length in characters first. Examples carry `meta["context"]`, `meta["endings"]` and the gold
index as `reference` (see `gspo.data.load_hellaswag`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rewards import RewardResult, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LETTERS = "ABCD"


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way the harness splits them: trailing spaces move
    to the continuation, and the continuation is whatever the joint text has beyond the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def loglikelihoods(
    model: PreTrainedModel,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    device: torch.device | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context, right-padded batches, one forward each."""
    device = device or next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None)
    # Longest first, so a batch holds similar lengths and padding stays small.
    order = sorted(range(len(requests)), key=lambda k: -(len(requests[k][0]) + len(requests[k][1])))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs, conts = [], []
        for k in idx:
            ctx, cont = requests[k]
            full = ctx + cont
            if max_len is not None:
                full = full[-(max_len + 1) :]  # keep the end: the continuation must be scored whole
            inputs.append(full[:-1])  # the last token predicts nothing we need
            conts.append(cont)
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # half-precision logits are summed in float32
        for row, k in enumerate(idx):
            n_in, cont = len(inputs[row]), conts[row]
            logp = logits[row, n_in - len(cont) : n_in].to(dtype).log_softmax(-1)  # (len(cont), V)
            target = torch.tensor(cont, device=logp.device)[:, None]
            out[k] = logp.gather(-1, target).sum().item()
    return out


def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict:
    """acc and acc_norm over `examples`, plus one prediction record per example."""
    if not examples:
        raise ValueError("no examples to score")
    requests: list[tuple[list[int], list[int]]] = []
    spans = []
    for e in examples:
        endings = e.meta["endings"]
        if not all(endings):
            raise ValueError(f"{e.id}: an ending is empty, so it has no length to normalise by")
        spans.append((len(requests), len(endings)))
        requests += [encode_pair(tokenizer, e.meta["context"], " " + ending) for ending in endings]
    was_training = model.training
    model.eval()
    try:
        lls = loglikelihoods(model, requests, batch_size, device)
    finally:
        model.train(was_training)
    predictions, hits, hits_norm = [], 0, 0
    for e, (first, n) in zip(examples, spans):
        ll = lls[first : first + n]
        pred, pred_norm = predict(ll, e.meta["endings"])
        gold = int(e.reference)
        hits += pred == gold
        hits_norm += pred_norm == gold
        predictions.append({"id": e.id, "label": gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll})
    n = len(examples)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n, "predictions": predictions}


def predict(lls: list[float], endings: list[str]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): the highest log-likelihood, raw and per character of the ending
    (the ending itself, not the joining space); ties go to the first, as numpy's argmax."""
    norm = [ll / len(ending) for ll, ending in zip(lls, endings)]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(". ")


def extract_choice(completion: str, endings: list[str] | None = None) -> tuple[int | None, str]:
    """(index, how) of the chosen option: an exact ending text, an "Answer: X" phrase, a leading letter
    ("B", "(B)", "B."), or a lone bracketed letter; (None, "") when nothing clear is there."""
    letters = LETTERS[: len(endings)] if endings else LETTERS
    first_line = next((line for line in completion.splitlines() if line.strip()), "")
    if endings:
        texts = [_normalise(e) for e in endings]
        if _normalise(first_line) in texts:
            return texts.index(_normalise(first_line)), "ending text"
    # Letters are matched upper-case only: a lower-case "a" is an article, not an option.
    phrase = re.search(rf"(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*\(?([{letters}])\b", completion)
    if phrase:
        return letters.index(phrase.group(1)), "answer phrase"
    lead = re.match(rf"\s*\(?([{letters}])(?:[.):]|\s*$|\s*\n)", completion)
    if lead:
        return letters.index(lead.group(1)), "leading letter"
    bracketed = set(re.findall(rf"\(([{letters}])\)", completion))
    if len(bracketed) == 1:
        return letters.index(bracketed.pop()), "bracketed letter"
    return None, ""


@register("choice")
@register("hellaswag")
def choice_reward(completion: str, example: Any) -> RewardResult:
    endings = example.meta.get("endings")
    gold = int(example.reference)
    index, how = extract_choice(completion, endings)
    if index is None:
        return RewardResult(0.0, "no_answer", None, "no answer letter or ending text found")
    letter = LETTERS[index]
    if index == gold:
        return RewardResult(1.0, "correct", letter, f"{how} {letter} is the reference")
    return RewardResult(0.0, "wrong", letter, f"{how} {letter}, reference {LETTERS[gold]}")
