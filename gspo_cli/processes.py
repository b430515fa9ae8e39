"""The processes `gspo` runs beside a flow: a temporary Prefect server that cannot outlive the command that
started it, and a Prefect worker that stops when asked.

Prefect's own temporary server (started when PREFECT_API_URL is unset) is a plain child process: a `gspo
run` killed with SIGKILL or SIGTERM left it running, parent PID 1, holding prefect.db. This one is started
with PR_SET_PDEATHSIG, so the kernel kills it when its parent dies however that happens, in a session of
its own, so a Ctrl-C in the terminal reaches only the command (which then closes its flow run on a live
server), with its output in the command's log file instead of the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: the child only calls it


def _die_with(parent: int):
    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def temporary_server(log: Path, timeout: float = 180) -> Iterator[str]:
    """A Prefect server on a free loopback port for the duration of the block, its output appended to `log`;
    yields its API URL. Servers on one PREFECT_HOME start one at a time: the first start creates and migrates
    prefect.db, and two at once would race on it."""
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    import prefect

    app_dir = Path(prefect.__file__).parent.parent
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    with open(home / ".server-start.lock", "a") as lock, open(log, "ab") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(app_dir),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )
            deadline = time.monotonic() + timeout
            while (
                proc.poll() is None
                and time.monotonic() < deadline
                and not _healthy(f"http://127.0.0.1:{port}/api/health")
            ):
                time.sleep(0.2)
            if proc.poll() is None:
                break
        if proc.poll() is not None or time.monotonic() >= deadline:
            _stop(proc)
            raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f} s (its output: {log})")
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (the flow runs a worker started)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d.name))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def run_worker(pool: str, limit: int | None, grace: float = 120) -> int:
    """A Prefect process worker on `pool` until SIGTERM or SIGINT. Then it passes SIGTERM to the flow runs it
    runs (each closes its flow run as crashed and its MLflow run as failed, keeping finished stages for a
    retry), waits up to `grace` seconds for them, stops polling and exits 0; a second signal kills them and
    exits at once.

    (`prefect worker start` forwards SIGTERM to itself as SIGINT and then ignores both while it waits.)"""
    from prefect.workers.process import ProcessWorker

    async def main() -> int:
        work = asyncio.ensure_future(ProcessWorker(work_pool_name=pool, limit=limit).start())
        stopping = asyncio.Event()
        signals: list[int] = []

        def stop(sig: int) -> None:
            signals.append(sig)
            if len(signals) > 1:
                _signal_all(_children(os.getpid()), signal.SIGKILL)
                os._exit(128 + sig)
            print(f"worker: {signal.Signals(sig).name}: stopping the running flow runs", file=sys.stderr, flush=True)
            stopping.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        await asyncio.wait([work, asyncio.ensure_future(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
        # Each flow run gets one SIGTERM (a second one would cut its crash report short), also one that the
        # worker started after the signal; the worker keeps running meanwhile, so their states reach the server.
        signalled: set[int] = set()
        deadline = time.monotonic() + grace
        while (running := _children(os.getpid())) and time.monotonic() < deadline:
            _signal_all([p for p in running if p not in signalled], signal.SIGTERM)
            signalled.update(running)
            await asyncio.sleep(0.5)
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        _signal_all(_children(os.getpid()), signal.SIGKILL)
        print("worker: stopped", file=sys.stderr, flush=True)
        return 0

    return asyncio.run(main())
