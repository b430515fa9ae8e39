"""GSM8K answer checking: rewards.math against math-verify on the same items, in one process.

Items: every GSM8K test gold, each as its solution's reasoning followed by model-style final answers
(right) and by gold+1 / gold*10 (wrong), plus hard formats with known truth. Both checkers get the
completion and the bare gold number; agreement is with the known truth. The last line is
`ratio=<our items/s over math-verify items/s>`.

    python bench/math_vs_math_verify.py [--data DIR] [--limit N]
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewards.math import extract_answer, gold_answer, is_equivalent

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

# (completion, gold, truth)
HARD = [
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("The answer is 1\\frac{1}{2}.", "1.5", True),
    ("Answer: \u22127", "-7", True),
    ("She owes -$5.", "-5", True),
    ("The answer is 25%.", "25", True),
    ("\\boxed{\\$18}", "18", True),
    ("The answer is 3/4.", "0.75", True),
    ("The answer is 12.50 dollars.", "12.5", True),
    ("The final answer is $\\boxed{1{,}234}$.", "1234", True),
    ("**Answer:** 42", "42", True),
    ("The answer is **42**.", "42", True),
    ("The answer is 2^{10}.", "1024", True),
    ("\\boxed{0.3333333}", "1/3", False),
    ("\\boxed{1234.0001}", "1234", False),
    ("I first thought 12.\n#### 13", "12", False),
    ("x = 1235", "1234", False),
    ("The answer is 12340.", "1234", False),
    ("The answer is -18.", "18", False),
]
BUILTIN_GOLDS = ["18", "3", "70,000", "540", "20", "64", "260", "160", "45", "460", "366", "694", "1,450,000", "7"]
REASONING = "First, 3 + 4 = 7 eggs.\nThen 7 * 2 = 14 dollars.\n"


def final_answers(n: int) -> list[tuple[str, bool]]:
    right = [
        f"The answer is ${n:,}.",
        f"\\boxed{{{n}}}",
        f"#### {n:,}",
        f"x = {n}",
        f"{n} dollars",
        f"Answer: {n}.00",
        f"The final answer is $\\boxed{{{n:,}}}$.",
        f"**Answer:** {n}",
    ]
    wrong = [f"The answer is {n + 1}.", f"\\boxed{{{n * 10}}}"] if n else [f"The answer is {n + 1}."]
    return [(a, True) for a in right] + [(a, False) for a in wrong]


def items(data: Path, limit: int | None) -> tuple[list[tuple[str, str, bool]], str]:
    if (data / "test.jsonl").exists():
        rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:limit]
        pairs = [(re.sub(r"<<.*?>>", "", r["answer"].rsplit("####", 1)[0]), gold_answer(r["answer"])) for r in rows]
        source = f"{len(rows)} GSM8K test golds from {data}"
    else:
        print(f"GSM8K data not found at {data}: using {len(BUILTIN_GOLDS)} built-in golds instead")
        pairs = [(REASONING, gold_answer(g)) for g in BUILTIN_GOLDS]
        source = f"{len(BUILTIN_GOLDS)} built-in golds"
    out = [(reasoning + a, gold, truth) for reasoning, gold in pairs for a, truth in final_answers(int(gold))]
    return out + HARD, source


def ours(completion: str, gold: str) -> bool:
    pred = extract_answer(completion)
    return pred is not None and is_equivalent(pred, gold)


def run(name, check, todo):
    check(*todo[0][:2])  # warm-up: imports and first-call caches
    t = time.perf_counter()
    verdicts = [check(c, g) for c, g, _ in todo]
    seconds = time.perf_counter() - t
    agree = sum(v == truth for v, (_, _, truth) in zip(verdicts, todo))
    hard = sum(v == truth for v, (_, _, truth) in zip(verdicts[-len(HARD) :], HARD))
    misses = [(c[-40:], g, truth) for v, (c, g, truth) in zip(verdicts, todo) if v != truth]
    print(
        f"{name:12s} agreement {agree}/{len(todo)} = {agree / len(todo):.4f}  (hard formats {hard}/{len(HARD)})"
        f"  {len(todo) / seconds:10.1f} items/s"
    )
    for c, g, truth in misses[:6]:
        print(f"    missed: ...{c!r} gold {g} truth {truth}")
    return len(todo) / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with GSM8K test.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test golds")
    args = ap.parse_args()
    from math_verify import parse, verify

    todo, source = items(args.data, args.limit)
    print(f"{len(todo)} items: {source}, {len(final_answers(1))} final-answer styles each, {len(HARD)} hard formats")
    ours_rate = run("rewards.math", ours, todo)
    mv_rate = run("math-verify", lambda c, g: verify(parse(g), parse(c)), todo)
    print(f"ratio={ours_rate / mv_rate:.1f}")


if __name__ == "__main__":
    main()
