"""Run the promotion gate for a registered version against the current champion, on demand."""

from __future__ import annotations

from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)

# isort: split
from prefect import flow, get_run_logger, runtime

from flows.common import summary
from gspo.config import load_config
from tasks import registry
from tasks.store import client, tracking_uri


@flow(name="promote")
def promote(version: str = "candidate", config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Move alias `champion` to `version` (a number or an alias) when its recorded score on
    pipeline.gate_metric beats the champion's by more than pipeline.gate_min_delta; the decision and its
    reason become the version's `promotion` tag. Always decided afresh: the champion may have moved."""
    cfg = load_config(config_path, overrides or [])
    p = cfg.pipeline
    uri, name = tracking_uri(p.mlflow_tracking_uri), p.registered_model
    c = client(uri, p.mlflow_wait)
    number = registry.resolve_version(c, name, version)
    gate = registry.promotion_gate(
        uri,
        p.mlflow_wait,
        name,
        number,
        None,
        p.gate_metric,
        p.gate_min_delta,
        None,
        str(Path(p.artifact_root).resolve()),
    )
    get_run_logger().info(
        f"{name} version {number}: "
        + ("promoted to champion: " if gate["promoted"] else "not promoted: ")
        + gate["reason"]
    )
    tags = c.get_model_version(name, number).tags
    scored = [k[len("score.") :] for k in tags if k.startswith("score.")]
    scores = {
        t: {"base": float(tags[f"base_score.{t}"]), "trained": float(tags[f"score.{t}"])}
        for t in scored
        if f"base_score.{t}" in tags
    }
    return summary(str(runtime.flow_run.id), name, number, scores, gate)
