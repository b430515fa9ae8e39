"""GSM8K reward: find the final answer in a completion and compare it exactly with the gold.

Model text is never evaluated. `sympify`/`parse_expr` call `eval` and `9**9**9` makes them run for
minutes, so numbers are read by one whitelisted regex grammar (integers with thousands separators,
decimals, a/b, LaTeX \\frac{a}{b} / \\dfrac / \\tfrac, mixed 1\\frac{1}{2}, sign, currency, and scientific
notation: 1e6, 2.5E-2, 1.5 \\times 10^{6}, 3 * 10**2) and built into exact sympy Rationals. Other powers
(2^10, 10**10**10) are not part of the grammar, numbers longer than MAX_DIGITS are refused, and only the
last MAX_SCAN characters of a completion are read, so any input gets a verdict in milliseconds from any
thread, with no timeouts needed.

Answer extraction, first rule that yields a number wins:
  1. the last `#### ...` line  2. the last \\boxed{...}  3. the last "answer is ..." / "Answer: ..."
  4. the last number anywhere.
Inside rules 1-3 the text after the last `=` is read (`x = 12`); it must hold exactly one number, which
is the answer (currency signs, units, words and `%` around it are ignored). Several numbers there
(`#### 12 or 15`, `#### 12 + 3`) are no answer at all, and extraction stops: taking the first would
reward hedging.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sympy import Rational

from gspo.io import atomic_file, read_jsonl
from rewards import RewardResult, register

log = logging.getLogger(__name__)

MAX_SCAN = 16_000  # completions are a few thousand characters; the answer is at the end
MAX_DIGITS = 300  # far beyond any real answer; keeps int() and Rational() cheap

_MINUS = "-\u2212"  # ASCII hyphen-minus and the unicode minus sign
_CURRENCY = r"(?:\\?\$|€|£|¥|₹)"
# Unsigned decimal: 1,234,567.89 (also LaTeX 1{,}234 and 1\,234), 1234.5, .5
_U = r"(?:[0-9]{1,3}(?:(?:,|\{,\}|\\,)[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# Scientific notation after a decimal: 1e6, 2.5E-2, 1.5 \times 10^{6}, 4 \cdot 10^{-2}, 3 × 10^2, 3 * 10**2
_SCI = r"""(?:[eE](?P<e>[-+\u2212]?[0-9]{1,4})
          | [ \t]{0,3}(?:\\times|\\cdot|×|·|\*|x)[ \t]{0,3}10[ \t]{0,3}(?:\^|\*\*)[ \t]{0,3}
            \{?[ \t]{0,3}(?P<t>[-+\u2212]?[0-9]{1,4})[ \t]{0,3}\}?)"""
_NUMBER = re.compile(
    rf"""
    (?<![\w.])                                   # not the middle of a word or of another number
    (?P<sign>[-+\u2212])?(?:{_CURRENCY}\s?)?(?P<sign2>[-\u2212])?
    (?:
        (?:(?P<whole>[0-9]+)\s?)?                # mixed number: 1\frac{{1}}{{2}}
        \\[dt]?frac(?:\{{\s*(?P<fn>[-\u2212]?{_U})\s*\}}\{{\s*(?P<fd>{_U})\s*\}}|(?P<fn1>[0-9])(?P<fd1>[0-9]))
      | (?P<num>{_U})(?:{_SCI}|\s?/\s?(?P<den>{_U}))?    # 12, 1,234.5, 1.5e3, 3/4
    )""",
    re.X,
)
# Only "answer is" and "Answer:": "answer was" and "answer =" show up in reasoning ("2 points/answer = 48")
_ANSWER_PHRASE = re.compile(r"\banswer(?:\*\*)?[ \t]{0,10}(?::|\bis\b)", re.I)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")
# A power's base or exponent: 2^10, 10**10, but not markdown bold as in "**Answer:** **42**"
_EXPONENT_AFTER = re.compile(r"[ \t]*\^|[ \t]*\*\*[ \t]*[0-9(]")
_EXPONENT_BEFORE = re.compile(r"(?:\^|[\w)\]}][ \t]*\*\*)[ \t{]*$")


def _decimal(s: str) -> Rational | None:
    s = s.replace("{,}", "").replace("\\,", "").replace(",", "")
    if len(s) - s.count(".") > MAX_DIGITS:
        return None
    whole, _, frac = s.partition(".")
    return Rational(int(whole + frac or "0"), 10 ** len(frac))


def _signed(s: str) -> Rational | None:
    neg = s[:1] in _MINUS
    v = _decimal(s[1:] if neg else s)
    return None if v is None else (-v if neg else v)


def _value(m: re.Match) -> Rational | None:
    """The number a `_NUMBER` match denotes, or None when it is too long or divides by zero."""
    g = m.groupdict()
    if g["num"] is not None:
        v = _decimal(g["num"])
        if v is not None and g["den"] is not None:
            d = _decimal(g["den"])
            v = None if not d else v / d
        exponent = g["e"] or g["t"]
        if v is not None and exponent is not None:
            k = int(exponent.replace("\u2212", "-"))
            digits = sum(c.isdigit() for c in g["num"])
            v = None if k > MAX_DIGITS - digits or k < -MAX_DIGITS else v * Rational(10) ** k
    else:
        if g["fn"] is not None:
            n, d = _signed(g["fn"]), _decimal(g["fd"])
        else:  # \frac12
            n, d = Rational(int(g["fn1"])), int(g["fd1"])
        v = None if n is None or not d else n / d
        if v is not None and g["whole"] is not None:
            w = _decimal(g["whole"])
            v = None if w is None else w + v
    if v is None:
        return None
    negative = (g["sign"] is not None and g["sign"] in _MINUS) != (g["sign2"] is not None)  # -$-5 is 5
    return -v if negative else v


def _matches(text: str, last: bool = False) -> Iterator[re.Match[str]]:
    """Every number the grammar finds in `text`, in order (`last`: from the end). A number that is the base
    or the exponent of a power (2^10, 10**10**10) is skipped: other powers are not in the grammar."""
    matches = _NUMBER.finditer(text)
    for m in reversed(list(matches)) if last else matches:
        if not (
            _EXPONENT_AFTER.match(text, m.end()) or _EXPONENT_BEFORE.search(text, max(0, m.start() - 8), m.start())
        ):
            yield m


def _final(span: str) -> tuple[Rational | None, int]:
    """(the answer, how many numbers) of a final-answer span: the text after its last `=` must hold one
    number; 0 means none, 2 several (a hedge), and then no value."""
    found = list(itertools.islice(_matches(span[span.rfind("=") + 1 :]), 2))
    return (_value(found[0]) if len(found) == 1 else None), len(found)


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces matched), or None if there is none or it is unclosed."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = i + len("\\boxed")
    while text[j : j + 1].isspace():
        j += 1
    if text[j : j + 1] != "{":
        return text[j:].split(None, 1)[0] if text[j:].strip() else None  # \boxed 12
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1 : k]
    return None


def _extract(text: str) -> tuple[Rational | None, str] | None:
    """(answer, the rule that found it); the answer is None when the rule's span holds several numbers.
    None when the completion holds no number."""
    if len(text) > MAX_SCAN:  # the leading "_" stops a number cut by the slice from being read
        text = "_" + text[-MAX_SCAN:]
    for rule, span in _final_spans(text):
        v, count = _final(span)
        if count > 1:
            return None, rule
        if v is not None:
            return v, rule
    last = next((v for v in map(_value, _matches(text, last=True)) if v is not None), None)
    return (last, "last number") if last is not None else None


def _final_spans(text: str) -> Iterator[tuple[str, str]]:
    """The spans rules 1-3 read, in order, each computed only when the one before holds no number."""
    i = text.rfind("####")
    if i >= 0:
        yield "#### line", text[i + 4 :].split("\n", 1)[0]
    box = _boxed(text)
    if box is not None:
        yield "\\boxed", box
    last = collections.deque(_ANSWER_PHRASE.finditer(text), maxlen=1)
    if last:
        phrase = last[0]
        end = _SENTENCE_END.search(text, phrase.end())
        yield "answer phrase", text[phrase.end() : end.start() if end else len(text)]


def _format(v: Rational) -> str:
    """Canonical text of a rational: 1234, -2.5 (when the decimal is exact), 1/3."""
    p, q = int(v.p), int(v.q)
    if q == 1:
        return str(p)
    twos = (q & -q).bit_length() - 1
    r, fives = q >> twos, 0
    while r % 5 == 0:
        r, fives = r // 5, fives + 1
    if r != 1:
        return f"{p}/{q}"
    k = max(twos, fives)  # q divides 10**k, so p/q has exactly k decimals
    digits = str(abs(p) * 10**k // q).rjust(k + 1, "0")
    return f"{'-' if p < 0 else ''}{digits[:-k]}.{digits[-k:]}"


def extract_answer(text: str) -> str | None:
    """The final answer of a completion as canonical number text ("1234", "-2.5", "3/4"), or None (also when
    the final answer holds several numbers)."""
    found = _extract(text)
    return None if found is None or found[0] is None else _format(found[0])


def parse_number(s: str) -> Rational | None:
    """Exact value of one number written alone: "1,234", "$18", "-3/4", "\\frac{3}{4}", "12.50", "25%", "1e6".
    None for anything else (words, expressions, powers, more than MAX_DIGITS digits)."""
    s = s.strip()
    if len(s) > MAX_SCAN:
        return None
    s = s.removesuffix(".").removesuffix("%").removesuffix("\\").rstrip()
    m = _NUMBER.fullmatch(s)
    return None if m is None else _value(m)


def is_equivalent(pred: str, gold: str) -> bool:
    """True when both strings are numbers (see parse_number) with exactly the same value."""
    a, b = parse_number(pred), parse_number(gold)
    return a is not None and b is not None and a == b


def gold_answer(answer_field: str) -> str:
    """Canonical gold from a GSM8K answer field (solution text ending in `#### N`) or a bare number."""
    found = extract_answer(str(answer_field))
    if found is None:
        raise ValueError(f"gold answer has no number: {str(answer_field)[:80]!r}")
    return found


def _judge(completion: str, gold: str) -> RewardResult:
    found = _extract(completion)
    if found is None:
        return RewardResult(0.0, "no_answer", None, "no number in the completion")
    if found[0] is None:
        return RewardResult(0.0, "wrong", None, f"the {found[1]} holds several numbers, not one answer")
    pred, rule = _format(found[0]), found[1]
    if found[0] == parse_number(gold):
        return RewardResult(1.0, "correct", pred, f"{pred} from {rule} equals gold {gold}")
    return RewardResult(0.0, "wrong", pred, f"{pred} from {rule} differs from gold {gold}")


@register("math")
@register("gsm8k")
def gsm8k_reward(completion: str, example: Any) -> RewardResult:
    """1.0 when the completion's final answer equals example.reference (`#### N` field or bare number)."""
    return _judge(completion, gold_answer(example.reference))


def score_file(in_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> dict:
    """Score a JSONL file of {"completion": str, "answer": GSM8K answer field or number} rows.

    Writes every row with `correct` (bool) and `extracted` (canonical answer or null) added, to
    out_path, by default beside the input with `_scored` before the suffix (runs/x.jsonl ->
    runs/x_scored.jsonl). The output appears whole or not at all. A bad row raises ValueError
    naming file, line and field. Returns {"n", "correct", "accuracy", "out"}.
    """
    src = Path(in_path)
    out = Path(out_path) if out_path is not None else src.with_name(src.stem + "_scored.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = n_correct = 0
    with atomic_file(out) as w:
        for where, row in read_jsonl(src):
            gold = _gold_of_row(where, row)
            result = _judge(row["completion"], gold)
            row["correct"], row["extracted"] = result.verdict == "correct", result.extracted
            w.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            n_correct += row["correct"]
        if n == 0:
            raise ValueError(f"{src}: no rows")
    log.info("%s: %d of %d correct; scored rows in %s", src, n_correct, n, out)
    return {"n": n, "correct": n_correct, "accuracy": n_correct / n, "out": str(out)}


def _gold_of_row(where: str, row: dict) -> str:
    for field, types in (("completion", (str,)), ("answer", (str, int, float))):
        if field not in row:
            raise ValueError(f"{where}: field {field!r} is missing")
        if not isinstance(row[field], types) or isinstance(row[field], bool):
            raise ValueError(
                f"{where}: field {field!r} must be {' or '.join(t.__name__ for t in types)}, "
                f"got {type(row[field]).__name__}"
            )
    try:
        gold = gold_answer(str(row["answer"]))
    except ValueError:
        raise ValueError(f"{where}: field 'answer' has no number: {str(row['answer'])[:80]!r}") from None
    return gold
