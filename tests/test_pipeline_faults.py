"""`gspo run` under faults, for real: the command killed with SIGKILL and stopped with SIGTERM mid-training,
two first runs at once in an empty directory, the MLflow store lost between runs. Each test runs the real
command in a private directory (its own temporary Prefect server, sqlite MLflow store and artifact root)
and checks what is left behind: no server process, no MLflow run stuck RUNNING, and nothing lost (the rerun
or the printed retry command completes, reusing what had finished)."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

# A short warm start and a small GSPO run on 2 CPU cores; LONG gives a killed run time to be mid-training.
SMALL = [
    "warm_start.steps=10",
    "warm_start.batch_size=8",
    "train.steps=3",
    "train.eval_every=0",
    "train.threads=1",
    "train.checkpoint_every=5",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "data.eval_size=10",
    "eval.limit=10",
    "eval.max_new_tokens=4",
    "eval.batch_size=10",
    "optim.lr=1e-3",
]
LONG = SMALL + ["train.steps=150"]


def gspo(cwd: Path, *args: str, overrides=SMALL) -> subprocess.Popen:
    """`gspo ARGS --set ...` in `cwd`, as a user runs it there: no Prefect server configured, stores under
    cwd/.gspo. Output goes to cwd/out.txt and cwd/err.txt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "gspo_cli", *args, *(a for o in overrides for a in ("--set", o))]
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


def finish(p: subprocess.Popen, cwd: Path) -> tuple[int, str, str]:
    p.wait(600)
    return p.returncode, (cwd / "out.txt").read_text(), (cwd / "err.txt").read_text()


def summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def wait_for(cwd: Path, text: str, p: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in (cwd / "err.txt").read_text():
        assert p.poll() is None, f"exited with {p.returncode} before {text!r}:\n{(cwd / 'err.txt').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.2)


def server_of(p: subprocess.Popen) -> psutil.Process:
    [server] = [c for c in psutil.Process(p.pid).children() if "prefect.server.api.server:create_app" in c.cmdline()]
    return server


def runs(cwd: Path) -> dict[str, tuple[str, dict]]:
    """MLflow run id -> (status, tags), read from the sqlite file directly."""
    db = sqlite3.connect(cwd / ".gspo" / "mlflow.db")
    out = {rid: (status, {}) for rid, status in db.execute("select run_uuid, status from runs")}
    for rid, key, value in db.execute("select run_uuid, key, value from tags"):
        out[rid][1][key] = value
    db.close()
    return out


def test_sigkill_of_gspo_run_takes_its_server_along_and_the_next_run_closes_its_mlflow_run(tmp_path):
    p = gspo(tmp_path, "run", overrides=LONG)
    wait_for(tmp_path, "gspo training:", p)
    server = server_of(p)
    p.kill()
    p.wait()
    server.wait(60)  # raises if the server outlives the command
    [(status, tags)] = runs(tmp_path).values()
    assert status == "RUNNING" and tags["gspo.pid"] == str(p.pid)
    kept = list((tmp_path / ".gspo" / "artifacts" / "train").glob(".*.work/checkpoints/step-*"))
    assert kept, "the killed run's training checkpoints are kept for the rerun"

    rc, out, err = finish(gspo(tmp_path, "run", overrides=LONG), tmp_path)
    assert rc == 0, err[-3000:]
    assert f"was left RUNNING by process {p.pid}, which is gone: marked FAILED" in err
    after = runs(tmp_path)
    killed = next(rid for rid, (_, t) in after.items() if t["gspo.pid"] == str(p.pid))
    assert after[killed][0] == "FAILED" and "ended without closing the run" in after[killed][1]["gspo.end"]
    assert after[summary(out)["mlflow_run_id"]][0] == "FINISHED"
    assert summary(out)["version"] == "1"


def test_sigterm_of_gspo_run_closes_its_runs_and_prints_the_retry_command_that_finishes_it(tmp_path):
    p = gspo(tmp_path, "run", overrides=LONG)
    wait_for(tmp_path, "gspo training:", p)
    server = server_of(p)
    p.send_signal(signal.SIGTERM)
    rc, _, err = finish(p, tmp_path)
    server.wait(60)
    last = err.strip().splitlines()[-1]
    assert rc == 128 + signal.SIGTERM and last.startswith("gspo run: stopped by SIGTERM"), err[-3000:]
    retry = last.rsplit("retry with: ", 1)[1].split()
    [(status, tags)] = runs(tmp_path).values()
    assert status == "FAILED" and "TerminationSignal" in tags["gspo.end"]
    flow_run_id = tags["prefect.flow_run_id"]
    assert retry[-2:] == ["retry", flow_run_id]
    assert "\r" not in err  # progress is plain lines when stderr is not a terminal

    rc, out, err = finish(gspo(tmp_path, "retry", flow_run_id, overrides=[]), tmp_path)
    assert rc == 0, err[-3000:]
    assert summary(out)["flow_run_id"] == flow_run_id and summary(out)["version"] == "1"
    [(status, tags)] = runs(tmp_path).values()  # the retried flow run finishes its own MLflow run
    assert status == "FINISHED" and tags["gspo.end"] == "finished"


@pytest.fixture(scope="module")
def two_first_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two `gspo run` of one config started at once in an empty directory (MLflow's sqlite schema, the
    experiment, Prefect's database, every stage and the registered model created by whichever comes first)."""
    d = tmp_path_factory.mktemp("two")
    procs = []
    for name in ("a", "b"):  # one directory; out/err files per process
        (d / name).mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        with open(d / name / "out.txt", "w") as out, open(d / name / "err.txt", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gspo_cli", "run", *(a for o in SMALL for a in ("--set", o))],
                    cwd=d,
                    env=env,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            )
    results = []
    for name, p in zip(("a", "b"), procs):
        p.wait(900)
        err = (d / name / "err.txt").read_text()
        assert p.returncode == 0, err[-3000:]
        results.append(summary((d / name / "out.txt").read_text()))
    return d, results


def test_two_first_runs_at_once_in_an_empty_directory_both_finish(two_first_runs):
    d, results = two_first_runs
    assert [r["version"] for r in results] == ["1", "1"]  # one checkpoint, registered once
    assert results[0]["checkpoint"] == results[1]["checkpoint"]
    statuses = {rid: status for rid, (status, _) in runs(d).items()}
    assert {statuses[r["mlflow_run_id"]] for r in results} == {"FINISHED"} and len(statuses) == 2


def test_a_lost_mlflow_store_is_registered_again(two_first_runs):
    d, results = two_first_runs
    lost = d / "lost"
    lost.mkdir()
    for name in ("mlflow.db", "mlartifacts"):
        shutil.move(d / ".gspo" / name, lost / name)
    rc, out, err = finish(gspo(d, "run"), d)
    assert rc == 0, err[-3000:]
    r = summary(out)
    # A new, empty registry: this checkpoint is its version 1 and, with no champion, promoted.
    assert (r["version"], r["promoted"], r["gate_reason"]) == ("1", True, "no champion yet")
    assert r["checkpoint"] == results[0]["checkpoint"]
    [(status, _)] = runs(d).values()
    assert status == "FINISHED"
    checkpoint = list((d / ".gspo" / "mlartifacts").rglob(f"{r['mlflow_run_id']}/artifacts/checkpoint/config.json"))
    assert checkpoint, "the new run holds the checkpoint the new registry's version points at"
