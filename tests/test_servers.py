"""The pipeline against real servers on loopback: `mlflow server` (sqlite store, artifacts proxied into a local
directory) and `prefect server start`, the deployments of prefect.yaml, `gspo worker`. The worker stopped with
SIGTERM, idle and in the middle of a flow run. The MLflow server stopping during registration: a short outage
is bridged; a longer one fails the stage after pipeline.mlflow_wait, naming the server, with the trained
checkpoint kept, and a rerun after the restart registers it once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import tasks  # noqa: F401  (offline Prefect / MLflow defaults before prefect is imported)

# isort: split
import mlflow.artifacts
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect.states import Cancelling

from flows.train_eval import train_eval
from gspo.resolve import dir_hash
from tasks import registry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the prefect and mlflow commands of this environment
POOL = "gspo-process"
# Under a minute of stages on 2 CPU cores: a short warm start, 2 GSPO steps, 10 problems of one eval task.
SMALL = [
    "model.name=tiny",
    "warm_start.steps=20",
    "warm_start.batch_size=8",
    "train.steps=2",
    "train.eval_every=2",
    "train.threads=1",
    "train.progress=false",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "data.eval_size=10",
    "eval.tasks=[arithmetic]",
    "eval.limit=10",
    "eval.max_new_tokens=4",
    "eval.batch_size=10",
    "pipeline.gate_metric=arithmetic",
    "pipeline.compare_grpo=false",
]
STAGES = {
    "prepare-data",
    "snapshot-model",
    "warm-start",
    "train-gspo",
    "register-checkpoint",
    "evaluate-arithmetic-base",
    "evaluate-arithmetic-trained",
    "promotion-gate",
    "report",
}
LINEAGE = {
    "dataset_hash",
    "config_hash",
    "base_model",
    "reference_hash",
    "selected_checkpoint",
    "code_version",
    "checkpoint_hash",
    "prefect_flow_run_id",
}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server or worker in its own process group, its output appended to logs/<name>.log."""

    def __init__(self, name: str, args: list, env: dict, logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(
                [str(a) for a in args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text)

    def wait_http(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.p.poll() is None, f"{self.name} exited with {self.p.returncode}\n{self.tail()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{self.name} not answering {url} after {timeout} s\n{self.tail()}")

    def family(self) -> list[psutil.Process]:
        try:
            me = psutil.Process(self.p.pid)
            return [me] + me.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s, to the process group and to every descendant found first: a worker
        starts each flow run in a session of its own."""
        family = self.family()
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            for proc in family:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            _, alive = psutil.wait_procs(family[1:], timeout=grace)
            if not alive:
                return


def cli(name: str, args: list, env: dict, logs: Path, timeout: float = 180) -> None:
    """A command run to completion; its output goes to logs/<name>.log and, on failure, into the assertion."""
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        r = subprocess.run(
            [str(a) for a in args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,
        )
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited with {r.returncode}\n{log.read_text()[-4000:]}"


def mlflow_server(d: Path, port: int, logs: Path) -> Proc:
    """`mlflow server` on loopback: sqlite store, artifacts proxied by the server into a local directory."""
    return Proc(
        "mlflow-server",
        [
            BIN / "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            d / "mlartifacts",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--workers",
            1,
        ],
        # The job runner (GenAI scorers, trace rollups) is unused here and would start five more processes.
        {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        logs,
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server and an MLflow server on free loopback ports, their stores and logs in a private
    directory. `procs` holds every process started here or by the tests; all are stopped at the end."""
    d = tmp_path_factory.mktemp("servers")
    logs = d / "logs"
    logs.mkdir()
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(d / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # The deployment's nightly schedule must not start a full-size run during the test.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GSPO_PROJECT_DIR": str(ROOT),
    }
    s = {
        "dir": d,
        "logs": logs,
        "env": env,
        "api": api,
        "mlflow_port": mlflow_port,
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "procs": {},
    }
    t0 = time.perf_counter()
    try:
        s["procs"]["prefect-server"] = Proc(
            "prefect-server",
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port],
            env,
            logs,
        )
        s["procs"]["mlflow-server"] = mlflow_server(d, mlflow_port, logs)
        s["procs"]["prefect-server"].wait_http(f"{api}/health")
        s["procs"]["mlflow-server"].wait_http(f"{s['mlflow']}/health")
        print(f"\nservers up in {time.perf_counter() - t0:.0f} s")
        # The flows this test process runs itself keep their Prefect home private too.
        with temporary_settings({PREFECT_API_URL: api, PREFECT_HOME: d / "prefect"}):
            yield s
    finally:
        APILogWorker.drain_all(timeout=10)  # this process's flow-run logs, while the server still takes them
        for p in reversed(list(s["procs"].values())):
            p.stop()


def logs_tail(s: dict) -> str:
    return "\n".join(p.tail() for p in s["procs"].values())


def listening_addresses(procs) -> set[tuple[str, int]]:
    found = set()
    for p in procs:
        for q in p.family():
            try:
                found |= {c.laddr[:2] for c in q.net_connections("inet") if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                pass
    return found


def task_runs(flow_run_id, expect: int) -> dict:
    """Stage name -> task run of a flow run, once every expected one is final (the server records task run
    states from events)."""
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as c:
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if (
                len(runs) >= expect and all(r.state and r.state.is_final() for r in runs)
            ) or time.monotonic() > deadline:
                return {_stage(r.name): r for r in runs}
            time.sleep(0.5)


def _stage(task_run_name: str) -> str:
    base, _, suffix = task_run_name.rpartition("-")
    return base if len(suffix) == 3 and all(ch in "0123456789abcdef" for ch in suffix) else task_run_name


def test_a_worker_runs_the_deployment_against_both_servers(servers):
    env, logs, procs = servers["env"], servers["logs"], servers["procs"]
    prefect = BIN / "prefect"
    t0 = time.perf_counter()
    cli("work-pool", [prefect, "--no-prompt", "work-pool", "create", POOL, "--type", "process"], env, logs)
    procs["worker"] = Proc(
        "worker", [sys.executable, "-m", "gspo_cli", "worker", "--pool", POOL, "--limit", 1], env, logs
    )
    cli("deploy", [prefect, "--no-prompt", "deploy", "--all"], env, logs)
    deployed = time.perf_counter() - t0

    # The deployment's own config file, made small; the stores are the servers and a private artifact root.
    name = "gspo-served"
    overrides = SMALL + [
        f"pipeline.mlflow_tracking_uri={servers['mlflow']}",
        f"pipeline.registered_model={name}",
        f"pipeline.artifact_root={servers['dir'] / 'artifacts'}",
    ]
    fr = run_deployment("train-eval/train-eval", parameters={"overrides": overrides}, timeout=600, poll_interval=1)
    seconds = time.perf_counter() - t0 - deployed
    print(f"work pool, deploy and worker start {deployed:.0f} s; deployment run {seconds:.0f} s")
    assert fr.state.is_completed(), f"{fr.state}\n{logs_tail(servers)}"
    runs = task_runs(fr.id, expect=len(STAGES))
    assert {s: r.state.name for s, r in runs.items()} == dict.fromkeys(STAGES, "Completed"), logs_tail(servers)
    assert fr.work_pool_name == POOL and fr.parameters["config_path"] == "configs/demo.yaml"

    c = MlflowClient(servers["mlflow"], servers["mlflow"])
    v = c.get_model_version_by_alias(name, "candidate")
    assert v.version == "1" and registry.aliases(c, name) == {"candidate": "1", "champion": "1"}
    assert set(v.tags) >= LINEAGE and v.tags["prefect_flow_run_id"] == str(fr.id)
    assert v.tags["base_model"].startswith("tiny@")
    run_ = c.get_run(v.run_id)
    assert run_.info.status == "FINISHED" and run_.data.tags["prefect.flow_run_id"] == str(fr.id)
    # The checkpoint went through the server into its artifact directory and comes back identical.
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert list((servers["dir"] / "mlartifacts").rglob("checkpoint/config.json"))
    got = mlflow.artifacts.download_artifacts(
        artifact_uri=c.get_model_version_download_uri(name, v.version),
        tracking_uri=servers["mlflow"],
        dst_path=str(servers["dir"] / "download"),
    )
    assert dir_hash(got) == v.tags["checkpoint_hash"]

    listening = listening_addresses(procs.values())
    assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, listening


def test_the_worker_stops_on_sigterm_and_closes_the_flow_run_it_was_running(servers):
    env, logs, procs = servers["env"], servers["logs"], servers["procs"]
    worker = procs["worker"]
    overrides = _overrides(servers, "gspo-stopped", servers["dir"] / "artifacts-stopped") + ["train.steps=400"]
    fr = run_deployment("train-eval/train-eval", parameters={"overrides": overrides}, timeout=0)
    deadline = time.monotonic() + 300
    with get_client(sync_client=True) as c:
        while not any(
            r.name == "train-gspo"
            for r in c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
        ):
            assert time.monotonic() < deadline, f"training never started\n{logs_tail(servers)}"
            time.sleep(1)
        worker.p.send_signal(signal.SIGTERM)
        assert worker.p.wait(120) == 0, worker.tail()
        assert "worker: stopped" in worker.log.read_text()
        assert c.read_flow_run(fr.id).state.name == "Crashed"
    assert _mlflow_run(servers, fr.id).info.status == "FAILED"
    # A new worker for the tests after this one.
    procs["worker"] = Proc(
        "worker", [sys.executable, "-m", "gspo_cli", "worker", "--pool", POOL, "--limit", 1], env, logs
    )


def test_a_flow_run_cancelled_during_training_ends_cancelled_and_keeps_its_checkpoints(servers):
    # Prefect tells a cancel from a crash only while its own SIGTERM handler is in place: training must leave it.
    root = servers["dir"] / "artifacts-cancelled"
    overrides = _overrides(servers, "gspo-cancelled", root) + ["train.steps=400"]
    fr = run_deployment("train-eval/train-eval", parameters={"overrides": overrides}, timeout=0)
    deadline = time.monotonic() + 300
    while not list(root.glob("train/.*.work/checkpoints/step-*")):
        assert time.monotonic() < deadline, f"training never started\n{logs_tail(servers)}"
        time.sleep(0.5)
    with get_client(sync_client=True) as c:
        c.set_flow_run_state(fr.id, Cancelling(), force=True)
        while not (state := c.read_flow_run(fr.id).state).is_final():
            assert time.monotonic() < deadline + 120, f"{state}\n{logs_tail(servers)}"
            time.sleep(0.5)
    assert state.type == StateType.CANCELLED, f"{state}\n{logs_tail(servers)}"
    assert list(root.glob("train/.*.work/checkpoints/step-*")), "the cancelled stage's checkpoints are kept to resume"
    assert _mlflow_run(servers, fr.id).info.status == "FAILED"


def _registration(servers, monkeypatch, on_running, overrides) -> tuple:
    """train_eval with `on_running` hooked to the registration stage; (state, its stage runs)."""
    monkeypatch.setattr(
        registry, "register_checkpoint", registry.register_checkpoint.with_options(on_running=[on_running])
    )
    state = train_eval(overrides=overrides, return_state=True)
    monkeypatch.undo()
    return state, task_runs(state.state_details.flow_run_id, expect=5)


def _overrides(servers, name: str, root: Path, wait: float | None = None) -> list[str]:
    return SMALL + [
        f"pipeline.mlflow_tracking_uri={servers['mlflow']}",
        f"pipeline.artifact_root={root}",
        f"pipeline.registered_model={name}",
        *([f"pipeline.mlflow_wait={wait}"] if wait is not None else []),
    ]


def _mlflow_run(servers, flow_run_id):
    c = MlflowClient(servers["mlflow"])
    [run_] = c.search_runs(
        [c.get_experiment_by_name("gspo").experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    return run_


def _restart_mlflow(servers) -> None:
    restarted = servers["procs"]["mlflow-server"] = mlflow_server(
        servers["dir"], servers["mlflow_port"], servers["logs"]
    )
    restarted.wait_http(f"{servers['mlflow']}/health")


def test_a_short_mlflow_outage_during_registration_is_bridged(servers, tmp_path, monkeypatch):
    name = "gspo-outage"

    def restart_soon(task, task_run, state):  # the server goes away as registration starts and comes back
        servers["procs"]["mlflow-server"].stop()
        threading.Thread(target=_restart_mlflow, args=(servers,)).start()

    state, runs = _registration(servers, monkeypatch, restart_soon, _overrides(servers, name, tmp_path, 600))
    assert state.is_completed(), f"{state}\n{logs_tail(servers)}"
    assert runs["register-checkpoint"].state.name == "Completed"
    c = MlflowClient(servers["mlflow"], servers["mlflow"])
    assert [v.version for v in c.search_model_versions(f"name = '{name}'")] == ["1"]
    assert c.get_run(state.result()["mlflow_run_id"]).info.status == "FINISHED"


def test_mlflow_server_down_longer_than_the_wait_fails_the_stage_and_a_rerun_registers_once(
    servers, tmp_path, monkeypatch
):
    uri, name, root = servers["mlflow"], "gspo-fault", tmp_path / "artifacts"

    def stop_server(task, task_run, state):
        servers["procs"]["mlflow-server"].stop()

    state, runs = _registration(servers, monkeypatch, stop_server, _overrides(servers, name, root, 3))
    assert state.is_failed(), f"{state}\n{logs_tail(servers)}"
    assert {s: r.state.name for s, r in runs.items()} == {
        "prepare-data": "Completed",
        "snapshot-model": "Completed",
        "warm-start": "Completed",
        "train-gspo": "Completed",
        "register-checkpoint": "Failed",
    }
    message = runs["register-checkpoint"].state.message
    assert f"MLflow tracking store {uri} did not answer for" in message and "pipeline.mlflow_wait=3" in message
    assert "then retry" in message

    # The trained checkpoint is kept, complete, where the rerun looks for it.
    kept = [json.loads(p.read_text()) for p in (root / "train").glob("*/result.json")]
    assert len(kept) == 1 and dir_hash(kept[0]["checkpoint"]) == kept[0]["checkpoint_hash"]

    _restart_mlflow(servers)  # the same store on the same port
    state = train_eval(overrides=_overrides(servers, name, root, 3), return_state=True)
    assert state.is_completed(), f"{state}\n{logs_tail(servers)}"
    runs = task_runs(state.state_details.flow_run_id, expect=len(STAGES))
    cached = {"prepare-data", "snapshot-model", "warm-start", "train-gspo"}
    assert {s: r.state.name for s, r in runs.items()} == {s: "Cached" if s in cached else "Completed" for s in STAGES}
    assert state.result()["checkpoint"] == kept[0]["checkpoint"]
    c = MlflowClient(uri, uri)
    versions = c.search_model_versions(f"name = '{name}'")
    assert [(v.version, v.tags["checkpoint_hash"]) for v in versions] == [("1", kept[0]["checkpoint_hash"])]
    assert registry.aliases(c, name)["candidate"] == "1"
