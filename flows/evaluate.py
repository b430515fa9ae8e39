"""Evaluate a registered model version (a number, or an alias such as `champion`) on cfg.eval.tasks."""
from __future__ import annotations

from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)
from prefect import flow, runtime

from gspo.config import load_config
from gspo.evaluate import TASKS
from tasks import evaluate, registry, tracking
from tasks.common import pick, stage


@flow(name="evaluate")
def evaluate_model(model: str = "champion", config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Score version or alias `model` of pipeline.registered_model; one MLflow run holds the scores.
    Weights already scored with the same settings (e.g. by train-eval) come back from the cache."""
    cfg = load_config(config_path, overrides or [])
    unknown = [t for t in cfg.eval.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"eval.tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    root = str(Path(cfg.pipeline.artifact_root).resolve())
    uri = tracking.tracking_uri(cfg.pipeline.mlflow_tracking_uri)
    name = cfg.pipeline.registered_model
    version = registry.resolve_version(registry.client(uri), name, model)
    tags = registry.client(uri).get_model_version(name, version).tags
    weights = stage(registry.fetch_version, root)(uri, name, version, tags.get("checkpoint_hash", ""), root)
    ml, run_id = tracking.start_run(cfg, uri, str(runtime.flow_run.id), runtime.flow_run.name)
    ok = False
    try:
        ml.set_tag(run_id, "registered_model", f"{name}/{version}")
        results = {t: stage(evaluate.evaluate, root)(pick(cfg, evaluate.reads(t)), weights["dir"], weights["hash"], t,
                                                      root, f"v{version}", cfg.train.progress)
                   for t in sorted(cfg.eval.tasks, key=TASKS.index)}
        tracking.log_scores(ml, run_id, {t: {f"v{version}": m} for t, m in results.items()})
        ok = True
    finally:
        tracking.finish(ml, run_id, ok)
    return {"registered_model": name, "version": version, "mlflow_run_id": run_id,
            "scores": {t: m["score"] for t, m in results.items()}, "results": results}
