import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from sympy import Rational

import rewards
from gspo.data import Example
from rewards.math import MAX_SCAN, extract_answer, gold_answer, gsm8k_reward, is_equivalent, parse_number, score_file


def ex(reference):
    return Example(id="0", prompt="q", reference=reference, task="gsm8k")


def rewrites(n: int) -> list[str]:
    """Ways a model writes the final answer n."""
    return [
        f"The answer is ${n:,}.",
        f"\\boxed{{{n}}}",
        f"#### {n:,}",
        f"x = {n}",
        f"{n} dollars",
        f"Answer: {n}.00",
        f"The final answer is $\\boxed{{{n:,}}}$.",
        f"**Answer:** {n}",
        f"So the total is {n:,} dollars.",
    ]


@pytest.mark.parametrize("split", ["test", "train"])
def test_every_gsm8k_gold_verifies_against_rewrites_and_not_wrong_numbers(gsm8k_dir, split):
    failures = []
    rows = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()]
    for row in rows:
        gold = gold_answer(row["answer"])
        n = int(gold)  # every GSM8K answer is an integer
        reasoning = re.sub(r"<<.*?>>", "", row["answer"].rsplit("####", 1)[0])
        right = [row["answer"], gold, reasoning + gold] + [reasoning + r for r in rewrites(n)]
        wrong = [reasoning + f"The answer is {n + 1}.", reasoning + f"\\boxed{{{n * 10}}}"] if n else []
        failures += [(gold, c[-60:]) for c in right if gsm8k_reward(c, ex(row["answer"])).verdict != "correct"]
        failures += [(gold, c[-60:]) for c in wrong if gsm8k_reward(c, ex(row["answer"])).verdict != "wrong"]
        assert is_equivalent(gold, gold)
    assert len(rows) > 1000
    assert failures == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 1,234", "1234"),
        ("#### $18 dollars", "18"),
        ("#### -5", "-5"),
        ("\\boxed{1234}", "1234"),
        ("The final answer is $\\boxed{\\$1{,}234}$.", "1234"),
        ("\\boxed{1\\,234}", "1234"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("\\boxed{\\tfrac{1}{3}}", "1/3"),
        ("\\boxed{\\frac12}", "0.5"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("\\boxed{\\frac{-3}{4}}", "-0.75"),
        ("\\boxed{1\\frac{1}{2}}", "1.5"),
        ("\\boxed{-2\\frac{1}{4}}", "-2.25"),
        ("\\boxed{x = 12}", "12"),
        ("\\boxed{12 \\text{ dollars}}", "12"),
        ("\\boxed{50\\%}", "50"),
        ("\\boxed {7}", "7"),
        ("\\boxed 7", "7"),
        ("The answer is $1,234.", "1234"),
        ("The answer is 1.5.", "1.5"),
        ("The answer is 3/4.", "0.75"),
        ("The answer is 25%.", "25"),
        ("The answer is x = 12. Check: 5 = 5", "12"),
        ("Answer: 1234.00", "1234"),
        ("Answer: \u22127", "-7"),
        ("answer: -$5", "-5"),
        ("Each answer = 2 points, so she has 48 points.\n50", "50"),
        ("**Answer:** 42", "42"),
        ("The answer is **42**.", "42"),
        ("The final answer is \u20ac12.50", "12.5"),
        ("It costs \u00a33 in total.", "3"),
        ("x = 1234", "1234"),
        ("1234 dollars", "1234"),
        ("so 9 * 2 = 18.", "18"),
        ("10-5", "5"),
        ("$-5$", "-5"),
        ("0.125", "0.125"),
        (".5", "0.5"),
        ("1/3", "1/3"),
        ("5^2 = 25", "25"),
        ("The answer is 2^{10}, which is 1024.", "1024"),
    ],
)
def test_extract_answer_formats(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 5.\n\\boxed{6}\n#### 7", "7"),  # #### beats \boxed
        ("#### no idea\n\\boxed{6}", "6"),  # a marker without a number falls through
        ("\\boxed{6}. The answer is 5.", "6"),  # \boxed beats the phrase
        ("The answer is 5. Then 3 more.", "5"),  # the phrase beats the last number
        ("First 3, then 4.\n#### 8\n#### 9", "9"),  # the last marker wins
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("\\boxed{\\frac{\\boxed{3}}{4}", "3"),  # the innermost last \boxed
    ],
)
def test_extraction_order(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no numbers here",
        "2^{10}",
        "10**10**10",
        "9^{9^{9^9}}",
        "1e400",
        "5/0",
        "\\boxed{",
        "9" * 1000,
        "x" * 100,
        "e5",
    ],
)
def test_no_answer(text):
    assert extract_answer(text) is None
    r = gsm8k_reward(text, ex("#### 5"))
    assert (r.score, r.verdict, r.extracted) == (0.0, "no_answer", None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1e6", "1000000"),
        ("The answer is 1E6.", "1000000"),
        ("#### 1.5E+3", "1500"),
        ("The answer is 2.5e-2.", "0.025"),
        ("#### 1,500e3 dollars", "1500000"),
        ("The answer is $2.5e6.", "2500000"),
        ("Answer: 7.5e\u22121 kg", "0.75"),
        ("\\boxed{1.5 \\times 10^{6}}", "1500000"),
        ("\\boxed{4 \\cdot 10^{-2}}", "0.04"),
        ("#### 2.5 × 10^3 km", "2500"),
        ("So 3 * 10**2 = 300 apples", "300"),
        ("x = 3e5", "300000"),
        ("It is 1.2e3 meters long.", "1200"),
        ("#### 1e300", None),  # 301 digits: over MAX_DIGITS, refused like any longer number
    ],
)
def test_scientific_notation_is_a_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "#### 12 or 15",
        "#### 12 + 3",
        "#### 12, 15",
        "#### 12 (or 15)",
        "#### 12 - 15",
        "\\boxed{12 \\text{ or } 15}",
        "\\boxed{12, 15}",
        "The answer is 12 or 15.",
        "Answer: 12 + 3",
        "The answer is 12 apples and 3 pears.",
        "#### 12 or 15\nThe answer is 12.",
        "The answer is 12 or 15. So 12.",
    ],
)
def test_a_final_answer_with_several_numbers_is_no_answer(text):
    assert extract_answer(text) is None
    for gold in ("12", "15"):  # whichever was right, the hedge is not rewarded
        r = gsm8k_reward(text, ex(gold))
        assert (r.score, r.verdict, r.extracted) == (0.0, "wrong", None) and "several numbers" in r.reason


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 12 + 3 = 15", "15"),
        ("#### 1,234", "1234"),
        ("#### $1,234.50", "1234.5"),
        ("#### 3/4", "0.75"),
        ("\\boxed{1\\frac{1}{2}}", "1.5"),
        ("\\boxed{x = 12}", "12"),
        ("#### -5 degrees", "-5"),
        ("The answer is 2^{10}, which is 1024.", "1024"),
        ("#### 1.5e3", "1500"),
    ],
)
def test_one_number_in_a_final_answer_is_the_answer(text, expected):
    assert extract_answer(text) == expected


def test_long_text_is_read_from_its_tail():
    assert extract_answer("#### 17\n" + "x" * 1_000_000 + " so #### 18") == "18"
    assert extract_answer("1234" + " " * MAX_SCAN) is None  # cut by the window: not read as 34
    assert extract_answer("The answer is " + " " * 500 + "18" + "9" * 500) is None  # too long, not cut to 18


@pytest.mark.parametrize(
    "s, value",
    [
        ("1,234", Rational(1234)),
        ("$18", Rational(18)),
        ("-3/4", Rational(-3, 4)),
        ("\\frac{3}{4}", Rational(3, 4)),
        ("12.50", Rational(25, 2)),
        ("25%", Rational(25)),
        ("25\\%", Rational(25)),
        ("18.", Rational(18)),
        ("\u22125", Rational(-5)),
        ("0.1", Rational(1, 10)),
        ("1\\frac{1}{2}", Rational(3, 2)),
        (" 7 ", Rational(7)),
        ("1{,}000{,}000", Rational(10**6)),
        ("1" + "0" * 299, Rational(10**299)),
    ],
)
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize(
    "s",
    [
        "1234 dollars",
        "abc",
        "",
        "1 + 2",
        "2^3",
        "10**2",
        "1e",
        "1e301",
        "1e3e3",
        "1/0",
        "1" + "0" * 300,
        "__import__('os')",
        "1,2345",
        "12 13",
    ],
)
def test_parse_number_refuses(s):
    assert parse_number(s) is None


def test_comparison_is_exact():
    assert is_equivalent("0.75", "3/4") and is_equivalent("\\frac{6}{8}", "0.75")
    assert is_equivalent("1,234", "1234.00") and is_equivalent("-0.5", "\u2212\\frac{1}{2}")
    assert not is_equivalent("0.333", "1/3") and not is_equivalent("0.3333333333", "1/3")
    assert not is_equivalent("1234.0001", "1234") and is_equivalent("1e3", "1000") and is_equivalent("2.5e-2", "1/40")
    assert not is_equivalent("abc", "abc")
    big = "9" * 300
    assert is_equivalent(big, big) and not is_equivalent(big, "9" * 299 + "8")


@pytest.mark.parametrize("value", ["1/3", "-1/8", "2.5", "0.00001", "-1234", "7/12", "0"])
def test_extracted_text_round_trips(value):
    v = parse_number(value)
    assert parse_number(extract_answer(f"The answer is {value}.")) == v


def test_gold_answer():
    assert gold_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,234") == "1234"
    assert gold_answer("18") == "18" and gold_answer("-3") == "-3" and gold_answer("3/4") == "0.75"
    with pytest.raises(ValueError, match="no number"):
        gold_answer("#### none")


def test_reward_verdicts_and_registry():
    assert rewards.get("gsm8k") is gsm8k_reward and rewards.get("math") is gsm8k_reward
    r = rewards.score("gsm8k", "So 9 * 2 = 18.\n#### 18", ex("She makes ... #### 18"))
    assert (r.score, r.verdict, r.extracted) == (1.0, "correct", "18") and "#### line" in r.reason
    r = rewards.score("math", "The answer is $19.", ex("18"))
    assert (r.score, r.verdict, r.extracted) == (0.0, "wrong", "19") and "answer phrase" in r.reason
    assert rewards.score("gsm8k", "I do not know", ex(18)).verdict == "no_answer"
    assert rewards.score("gsm8k", "#### 18", ex("no gold")).verdict == "error"


HOSTILE = {
    "long digits": "9" * 1_000_000,
    "long digits after marker": "The answer is " + "9" * 5000 + ".\n#### " + "1" * 5000,
    "power tower": "The answer is 10**10**10",
    "latex tower": "\\boxed{9^{9^{9^9}}}",
    "deep boxed": "\\boxed{" * 200_000,
    "deep frac": "\\frac{" * 100_000 + "1" + "}" * 100_000,
    "control chars": "".join(map(chr, range(32))) * 30_000 + "#### 5\x00",
    "megabytes": "The answer is 5. " * 200_000,
    "comma chain": "1," * 500_000,
    "slash chain": "1/" * 500_000,
    "thin spaces": "1\\," * 300_000,
    "spaces after answer": "answer" + " " * 1_000_000 + "is 5",
    "many markers": "#### " * 200_000,
    "many phrases": "The answer is " * 100_000,
    "mixed fractions": "12\\frac{1}{" * 100_000,
    "equals": "=" * 1_000_000 + "5",
    "carets": "2^" * 500_000,
    "stars": "2**" * 300_000,
    "exponent chain": "1e" * 500_000,
    "signed exponents": "1e-" * 300_000 + "1e+9999",
    "times ten chain": "1.5 \\times 10^{" * 100_000,
    "times ten spaces": ("2   ×   10   ^   " * 60_000),
    "huge exponents": "9e9999 " * 100_000,
    "many hedges": "#### " + "12 or " * 200_000 + "15",
}


def _verdict(text):
    r = rewards.score("gsm8k", text, ex("#### 5"))
    parse_number(text), is_equivalent(text, text)
    return r.verdict


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_gets_a_verdict(name):
    assert _verdict(HOSTILE[name]) in ("correct", "wrong", "no_answer")


def test_hostile_input_from_worker_threads():
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_verdict, HOSTILE.values()))
    assert all(v in ("correct", "wrong", "no_answer") for v in results)


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    texts = [
        code,
        f"#### {code}",
        f"\\boxed{{{code}}}",
        f"The answer is {code}.",
        f"x = {code}",
        f'The answer is eval("{code}")',
        f"#### 1 + {code}",
    ]
    for t in texts:
        assert rewards.score("gsm8k", t, ex("#### 5")).verdict in ("wrong", "no_answer")
        rewards.score("gsm8k", "#### 5", ex(t))  # as the gold too
        assert parse_number(t) is None and not is_equivalent(t, t)
    assert not marker.exists()


def _write(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def test_score_file(tmp_path):
    src = tmp_path / "gen.jsonl"
    _write(
        src,
        [
            {"completion": "so 9 * 2 = 18\n#### 18", "answer": "Janet ... #### 18", "id": 1},
            "\n",
            {"completion": "The answer is 3.", "answer": 4},
            {"completion": "no idea", "answer": "#### 1,234"},
        ],
    )
    summary = score_file(src)
    out = tmp_path / "gen_scored.jsonl"
    assert summary == {"n": 3, "correct": 1, "accuracy": 1 / 3, "out": str(out)}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["correct"], r["extracted"]) for r in rows] == [(True, "18"), (False, "3"), (False, None)]
    assert rows[0]["id"] == 1
    assert score_file(src, tmp_path / "sub" / "o.jsonl")["out"] == str(tmp_path / "sub" / "o.jsonl")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"completion": "1", "answer": "1"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"answer": "1"}', "field 'completion' is missing"),
        ('{"completion": "1"}', "field 'answer' is missing"),
        ('{"completion": 1, "answer": "1"}', "field 'completion' must be str"),
        ('{"completion": "1", "answer": true}', "field 'answer' must be str or int or float"),
        ('{"completion": "1", "answer": "none"}', "field 'answer' has no number"),
    ],
)
def test_score_file_bad_row_names_file_line_and_field(tmp_path, line, message):
    src = tmp_path / "gen.jsonl"
    _write(src, [{"completion": "#### 1", "answer": "1"}, line + "\n"])
    with pytest.raises(ValueError) as e:
        score_file(src)
    assert str(e.value).startswith(f"{src}:2: ") and message in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl"]  # nothing half-written left


def test_score_file_keeps_a_previous_output_when_it_fails(tmp_path):
    src, out = tmp_path / "gen.jsonl", tmp_path / "out.jsonl"
    out.write_text("previous\n")
    _write(src, [{"completion": "#### 1", "answer": "1"}, "not json\n"])
    with pytest.raises(ValueError):
        score_file(src, out)
    assert out.read_text() == "previous\n"
    _write(src, [])
    with pytest.raises(ValueError, match="no rows"):
        score_file(src, out)
