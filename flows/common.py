"""What the flows share: the check of every input before the first stage, and the one summary they return."""

from __future__ import annotations

from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)

# isort: split
from gspo.config import Config
from gspo.evaluate import eval_examples
from gspo.task_table import TASKS, evaluation_reads
from tasks.common import pick
from tasks.registry import settings_hash


def check_inputs(cfg: Config, evaluate_only: bool = False) -> None:
    """Read every input the flow will read before its first stage, so a missing or broken file (or a hub
    dataset that cannot be reached) is one line naming it now, not after training and registration."""
    d = cfg.data
    if not evaluate_only and d.path is not None and not Path(d.path).exists():
        raise FileNotFoundError(f"data.path: {d.path} does not exist")
    for t in cfg.eval.tasks:
        field = TASKS[t].eval_path
        path = getattr(cfg.eval, field) if field else None
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"eval.{field}: {path} does not exist")
        try:
            eval_examples(t, cfg)  # every row parsed: a bad line fails here, naming file and line
        except RuntimeError as e:  # the hub is unreachable
            raise ValueError(f"eval.tasks: {t}: {e}") from None


def eval_settings(cfg: Config) -> dict[str, str]:
    """task -> hash of the config its scoring reads: two versions' scores are comparable when equal."""
    return {t: settings_hash(pick(cfg, evaluation_reads(t))) for t in cfg.eval.tasks}


def summary(
    flow_run_id: str,
    name: str,
    version: str,
    scores: dict,
    gate: dict | None = None,
    mlflow_run_id: str | None = None,
    **extra,
) -> dict:
    """The JSON every flow returns (and `gspo run|evaluate|promote` prints as its last line): the registered
    model and version, the champion after this run, the promotion decision (None when there was none) and
    scores {task: {model: score}}; plus what the flow adds (report, checkpoint)."""
    gate = gate or {}
    return {
        "flow_run_id": flow_run_id,
        "mlflow_run_id": mlflow_run_id,
        "registered_model": name,
        "version": version,
        "champion": gate.get("champion"),
        "promoted": gate.get("promoted"),
        "gate_reason": gate.get("reason"),
        "scores": scores,
        **extra,
    }
