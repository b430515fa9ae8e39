"""The MLflow run of a flow run: config as params, datasets as inputs, per-step training metrics,
evaluation metrics, report and config as artifacts. Plain functions, called from the flow on every run
(cached stages return their outputs; this logs them into the new run)."""
from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from gspo.config import Config, save_config
from tasks.registry import client

FLOW_RUN_TAG = "prefect.flow_run_id"
_BATCH = 500


def tracking_uri(uri: str) -> str:
    """A relative sqlite URI made absolute, so every process and cache key means the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        return prefix + str(path)
    return uri


def _experiment(c: MlflowClient, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns of whatever directory
        db = Path(uri[len("sqlite:///"):])
        location = (db.parent / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(cfg: Config, uri: str, flow_run_id: str, flow_run_name: str) -> tuple[MlflowClient, str]:
    """The MLflow run of this flow run: created once, picked up again when the flow run is retried."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    exp = _experiment(c, cfg.pipeline.experiment, uri)
    found = c.search_runs([exp], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return c, run_id
    run = c.create_run(exp, run_name=flow_run_name,
                       tags={FLOW_RUN_TAG: flow_run_id, "config_hash": cfg.section_hash()})
    params = [Param(k, str(v)) for k, v in _flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i:i + 100])
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


def log_datasets(c: MlflowClient, run_id: str, data: dict) -> None:
    """Each snapshot as a dataset input: its file, its content digest, and the split as context."""
    inputs = []
    for split, entry in data.items():
        if not isinstance(entry, dict):
            continue
        with warnings.catch_warnings():  # a local path matches the "" and "file" sources, which are the same class
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(entry["path"])
        ds = MetaDataset(source, name=f"{split}-{entry['sha'][:8]}", digest=entry["sha"][:16])
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    c.log_inputs(run_id, datasets=inputs)


def log_step_metrics(c: MlflowClient, run_id: str, path: str, prefix: str = "") -> None:
    """Every numeric value of a metrics JSONL file (one object per step), unless this run already has them
    (a retried flow run logs into the same MLflow run)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or f"{prefix}{next(k for k in rows[0] if k != 'step')}" in c.get_run(run_id).data.metrics:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{k}", float(v), now, int(r["step"])) for r in rows for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(metrics), _BATCH):
        c.log_batch(run_id, metrics=metrics[i:i + _BATCH])


def log_scores(c: MlflowClient, run_id: str, results: dict) -> None:
    """eval/<task>/<model>/<metric> for every numeric metric; eval/<task>/delta of the score when both a
    base and a trained model were scored."""
    metrics, now = [], int(time.time() * 1000)
    for t, by_model in results.items():
        for which, m in by_model.items():
            # MLflow metric names cannot hold "@": pass@1 is logged as pass_at_1.
            metrics += [Metric(f"eval/{t}/{which}/{k.replace('@', '_at_')}", float(v), now, 0) for k, v in m.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if {"base", "trained"} <= set(by_model):
            metrics.append(Metric(f"eval/{t}/delta", by_model["trained"]["score"] - by_model["base"]["score"], now, 0))
    c.log_batch(run_id, metrics=metrics)


def log_report(c: MlflowClient, run_id: str, report_dir: str) -> None:
    c.log_artifacts(run_id, report_dir, "report")


def finish(c: MlflowClient, run_id: str, ok: bool) -> None:
    try:
        c.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    except MlflowException as e:
        if ok:
            raise
        # The flow is already failing: its own error (say, registration against a dead server) must stay the
        # one reported, not this follow-up failure to close the run.
        warnings.warn(f"MLflow run {run_id} left RUNNING: {e}")
