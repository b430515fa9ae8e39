import json
from pathlib import Path

import pytest
import torch

import rewards
from gspo.config import load_config
from gspo.data import load_examples, prepare_splits
from gspo.evaluate import code_completion, eval_examples, evaluate_task, score_code
from gspo.models import load_model, load_tokenizer
from gspo.tiny import save_tiny
from rewards.choice import score_choices

FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["train.threads=1", "eval.max_new_tokens=6", "eval.batch_size=3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_arithmetic_scores_its_own_test_split_and_the_score_is_the_mean_reward(tiny, tmp_path):
    cfg = load_config(None, FAST + ["eval.limit=7", "data.eval_size=30", "warm_start.steps=1"])
    s = prepare_splits(cfg)
    held = eval_examples("arithmetic", cfg)
    assert len(held) == 7
    # Never trained on, and not the held-out split that picks the best checkpoint either.
    test_prompts = {e.prompt for e in held}
    assert not test_prompts & {e.prompt for e in s.train + s.held_out + s.warm_start}
    calls = []
    m = evaluate_task(tiny, "arithmetic", cfg, tmp_path / "p.jsonl", on_progress=lambda d, n: calls.append((d, n)))
    rows = _rows(tmp_path / "p.jsonl")
    assert m["n"] == len(rows) == 7 and calls == [(3, 7), (6, 7), (7, 7)]
    again = [rewards.score("arithmetic", r["completion"], e).score for r, e in zip(rows, held)]
    assert m["score"] == pytest.approx(sum(again) / 7)
    # Greedy: the same model scores the same completions twice.
    assert evaluate_task(tiny, "arithmetic", cfg, tmp_path / "q.jsonl") == m
    assert _rows(tmp_path / "q.jsonl") == rows


def test_hellaswag_matches_unbatched_choice_scoring(tiny, tmp_path):
    cfg = load_config(None, FAST + [f"eval.hellaswag_path={FIXTURES / 'hellaswag.jsonl'}", "eval.limit=0"])
    m = evaluate_task(tiny, "hellaswag", cfg, tmp_path / "p.jsonl")
    model = load_model(tiny, cfg.model, torch.device("cpu"), trainable=False)
    ref = score_choices(
        model, load_tokenizer(tiny), load_examples("hellaswag", FIXTURES / "hellaswag.jsonl"), batch_size=64
    )
    assert m == {"score": ref["acc_norm"], "n": 6, "acc": ref["acc"], "acc_norm": ref["acc_norm"]}
    assert [r["pred_norm"] for r in _rows(tmp_path / "p.jsonl")] == [p["pred_norm"] for p in ref["predictions"]]


def test_gsm8k_reads_the_test_split_and_checks_answers_with_the_math_reward(tiny, tmp_path, gsm8k_dir):
    cfg = load_config(None, FAST + [f"eval.gsm8k_path={gsm8k_dir}", "eval.limit=4"])
    examples = eval_examples("gsm8k", cfg)
    assert [e.id for e in examples] == [f"gsm8k/test/{i}" for i in range(4)]
    m = evaluate_task(tiny, "gsm8k", cfg, tmp_path / "p.jsonl")
    rows = _rows(tmp_path / "p.jsonl")
    assert (
        m["n"] == 4
        and m["score"] == sum(rewards.score("gsm8k", r["completion"], e).score for r, e in zip(rows, examples)) / 4
    )


def test_code_completion_cuts_raw_continuations_and_takes_fenced_code():
    assert code_completion("    return a + b\n\ndef other():\n    pass") == "    return a + b\n"
    assert code_completion("    return 1\nif __name__ == '__main__':\n    f()") == "    return 1"
    fenced = "Here it is:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert code_completion(fenced) == "\ndef f(x):\n    return x\n"


def test_pass_at_k_from_sandboxed_runs_of_canonical_and_broken_solutions():
    cfg = load_config(None, ["eval.humaneval_samples=2", "eval.code_timeout=10"])
    problems = load_examples("humaneval")[:3]
    repeated = [p for p in problems for _ in range(2)]
    # Per problem: the canonical solution, then one that returns None.
    completions = [c for p in problems for c in (p.reference["canonical_solution"], "    return None\n")]
    m, rows = score_code(repeated, completions, 2, cfg)
    assert m == {"score": 0.5, "n": 3, "pass@1": 0.5}
    assert [r["passed"] for r in rows] == [True, False] * 3
    m, _ = score_code(problems, [p.reference["canonical_solution"] for p in problems], 1, cfg)
    assert m["pass@1"] == 1.0


def test_humaneval_end_to_end_on_the_tiny_model(tiny, tmp_path):
    cfg = load_config(None, FAST + ["eval.limit=2"])
    m = evaluate_task(tiny, "humaneval", cfg, tmp_path / "p.jsonl")
    rows = _rows(tmp_path / "p.jsonl")
    assert m["n"] == 2 and m["score"] == m["pass@1"] == sum(r["passed"] for r in rows) / 2
    assert all(r["result"] for r in rows)


def test_unknown_task_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="unknown evaluation task 'mmlu'"):
        evaluate_task(tiny, "mmlu", load_config(None, []))
