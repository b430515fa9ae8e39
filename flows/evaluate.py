"""Evaluate a registered model version (a number, or an alias such as `champion`) on cfg.eval.tasks."""

from __future__ import annotations

from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)

# isort: split
from prefect import flow, get_run_logger, runtime

from flows.common import check_inputs, summary
from gspo.config import load_config
from gspo.task_table import EVAL_TASKS, evaluation_reads
from tasks import evaluate, registry, tracking
from tasks.common import pick, stage
from tasks.store import client, tracking_uri


@flow(name="evaluate")
def evaluate_model(model: str = "champion", config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Score version or alias `model` of pipeline.registered_model; one MLflow run holds the scores.
    Weights already scored with the same settings (e.g. by train-eval) come back from the cache."""
    cfg = load_config(config_path, overrides or [])
    check_inputs(cfg, evaluate_only=True)
    p = cfg.pipeline
    root, uri, name = str(Path(p.artifact_root).resolve()), tracking_uri(p.mlflow_tracking_uri), p.registered_model
    c = client(uri, p.mlflow_wait)
    version = registry.resolve_version(c, name, model)
    tags = c.get_model_version(name, version).tags
    weights = stage(registry.fetch_version, root)(
        uri, p.mlflow_wait, name, version, tags.get("checkpoint_hash", ""), root
    )
    ml, run_id = tracking.start_run(cfg, uri, str(runtime.flow_run.id), runtime.flow_run.name)
    error, label = "", f"v{version}"
    try:
        ml.set_tag(run_id, "registered_model", f"{name}/{version}")
        results = {
            t: stage(evaluate.evaluate, root)(
                pick(cfg, evaluation_reads(t)), weights["dir"], weights["hash"], t, root, label, cfg.train.progress
            )
            for t in sorted(cfg.eval.tasks, key=EVAL_TASKS.index)
        }
        tracking.log_scores(ml, run_id, {t: {label: m} for t, m in results.items()})
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        tracking.finish(ml, run_id, not error, error)
    scores = {t: {label: m["score"]} for t, m in results.items()}
    get_run_logger().info(f"{name} version {version}: " + ", ".join(f"{t} {s[label]:.4f}" for t, s in scores.items()))
    return summary(
        str(runtime.flow_run.id),
        name,
        version,
        scores,
        {"champion": registry.aliases(c, name).get("champion")},
        run_id,
        results=results,
    )
