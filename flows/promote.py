"""Run the promotion gate for a registered version against the current champion, on demand."""
from __future__ import annotations

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)
from prefect import flow
from prefect.cache_policies import NO_CACHE

from gspo.config import load_config
from tasks import registry, tracking


@flow(name="promote")
def promote(version: str = "candidate", config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Move alias `champion` to `version` (a number or an alias) when its recorded score on
    pipeline.gate_metric beats the champion's by more than pipeline.gate_min_delta; the decision and its
    reason become the version's `promotion` tag. Always decided afresh: the champion may have moved."""
    cfg = load_config(config_path, overrides or [])
    uri = tracking.tracking_uri(cfg.pipeline.mlflow_tracking_uri)
    name = cfg.pipeline.registered_model
    number = registry.resolve_version(registry.client(uri), name, version)
    gate = registry.promotion_gate.with_options(cache_policy=NO_CACHE, persist_result=False)
    return {"registered_model": name, "version": number,
            **gate(uri, name, number, None, cfg.pipeline.gate_metric, cfg.pipeline.gate_min_delta)}
