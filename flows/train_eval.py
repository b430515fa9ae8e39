"""The main job: dataset prep -> reference model -> GSPO training -> registration -> evaluation of the
reference and the trained checkpoint -> promotion gate -> report.

Every stage is a cached Prefect task (tasks/); a rerun recomputes only the stages whose inputs changed.
`gspo run --config FILE --set k=v` runs it through `run_from_cli`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)
from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from gspo.config import Config, load_config
from gspo.evaluate import TASKS
from tasks import data, evaluate, model, registry, report, tracking, train
from tasks.common import pick, stage


def check(cfg: Config) -> None:
    unknown = [t for t in cfg.eval.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"eval.tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if cfg.pipeline.gate_metric not in cfg.eval.tasks:
        raise ValueError(f"pipeline.gate_metric: {cfg.pipeline.gate_metric!r} is not one of eval.tasks "
                         f"({', '.join(cfg.eval.tasks)})")


def grpo_config(cfg: Config) -> Config:
    """The GRPO baseline: the same run with token-level ratios and their clip range (0.2)."""
    return dataclasses.replace(cfg, gspo=dataclasses.replace(cfg.gspo, importance_sampling_level="token",
                                                             epsilon_low=None, epsilon_high=None))


def _weights(stage_result: dict) -> dict:
    """What an evaluation keys on: where the weights are and their content hash."""
    return {"dir": stage_result["dir"], "hash": stage_result["hash"]}


@flow(name="train-eval")
def train_eval(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train and evaluate one configuration (a YAML file plus `section.field=value` overrides)."""
    cfg = load_config(config_path, overrides or [])
    check(cfg)
    root = str(Path(cfg.pipeline.artifact_root).resolve())
    uri = tracking.tracking_uri(cfg.pipeline.mlflow_tracking_uri)
    name, progress = cfg.pipeline.registered_model, cfg.train.progress
    ml, run_id = tracking.start_run(cfg, uri, str(runtime.flow_run.id), runtime.flow_run.name)
    ok = False
    try:
        # 1. dataset prep
        snapshots = stage(data.prepare_data, root)(pick(cfg, data.READS), root)
        tracking.log_datasets(ml, run_id, snapshots)
        splits = {"train": snapshots["train"], "held_out": snapshots["held_out"]}

        # 2. base / reference model, with the optional supervised warm start
        base = stage(model.snapshot_model, root)(pick(cfg, model.SNAPSHOT_READS), root)
        reference = base
        if cfg.warm_start.steps:
            reference = stage(model.warm_start_model, root)(pick(cfg, model.WARM_START_READS), _weights(base),
                                                            snapshots["warm_start"], root, progress)
            tracking.log_step_metrics(ml, run_id, reference["metrics"], "warm_start/")

        # 3. GSPO training (and the GRPO baseline for the comparison plots)
        trained = stage(train.train_policy, root)(pick(cfg, train.READS), _weights(reference), splits, root,
                                                  "gspo", progress)
        tracking.log_step_metrics(ml, run_id, trained["metrics"])
        grpo = None
        if cfg.pipeline.compare_grpo:
            grpo = stage(train.train_policy, root)(pick(grpo_config(cfg), train.READS), _weights(reference), splits,
                                                   root, "grpo", progress)
            tracking.log_step_metrics(ml, run_id, grpo["metrics"], "grpo/")
        checkpoint = {"dir": trained["checkpoint"], "hash": trained["checkpoint_hash"]}

        # 4. checkpoint registration
        lineage = {"dataset_hash": snapshots["hash"], "config_hash": cfg.section_hash(),
                   "base_model": f"{base['name']}@{base['hash'][:16]}", "reference_hash": reference["hash"][:16],
                   "selected_checkpoint": trained["selected"], "code_version": registry.code_version()}
        version = stage(registry.register_checkpoint, root)(uri, name, checkpoint, lineage, run_id, root)

        # 5-7. HumanEval, GSM8K, HellaSwag, arithmetic: the reference and the trained model each
        results = {}
        for t in sorted(cfg.eval.tasks, key=TASKS.index):
            scored = {}
            for label, weights in (("base", reference), ("trained", checkpoint)):
                scored[label] = stage(evaluate.evaluate, root)(pick(cfg, evaluate.reads(t)), weights["dir"],
                                                               weights["hash"], t, root, label, progress)
            results[t] = scored
        tracking.log_scores(ml, run_id, results)
        scores = {t: {k: m["score"] for k, m in r.items()} for t, r in results.items()}

        # 9. promotion gate (before the report, so the report can say what it decided and why)
        gate = stage(registry.promotion_gate, root)(uri, name, version["version"], scores, cfg.pipeline.gate_metric,
                                                    cfg.pipeline.gate_min_delta, cfg.section_hash("eval"))

        # 8. report
        facts = [f"config hash: {cfg.section_hash()}", f"dataset hash: {snapshots['hash']}",
                 f"base model: {lineage['base_model']}" + (" + warm start" if cfg.warm_start.steps else ""),
                 f"registered: {name} version {version['version']} (alias candidate)",
                 ("promoted to champion: " if gate["promoted"] else "not promoted: ") + gate["reason"]]
        rep = stage(report.build_report, root)(facts, trained, grpo, results, root)  # no run ids: it stays cached
        create_markdown_artifact(f"{rep['markdown_text']}\nMLflow run `{run_id}`, report `{rep['html']}`\n",
                                 key="gspo-report", description=f"{name} version {version['version']}")
        tracking.log_report(ml, run_id, rep["dir"])
        ml.set_tag(run_id, "promotion", ("promoted: " if gate["promoted"] else "not promoted: ") + gate["reason"])
        ok = True
    finally:
        tracking.finish(ml, run_id, ok)
    return {"report": rep["markdown"], "report_html": rep["html"], "mlflow_run_id": run_id,
            "registered_model": name, "version": version["version"], "promoted": gate["promoted"],
            "gate_reason": gate["reason"], "checkpoint": trained["checkpoint"], "scores": scores,
            "flow_run_id": str(runtime.flow_run.id)}


def run_from_cli(config_path: str | None, overrides: list[str] | tuple = ()) -> dict:
    """`gspo run`: the config is loaded and checked here first, so a bad value is one line of error
    before any server starts; the flow then reads the same file and overrides."""
    check(load_config(config_path, overrides))
    path = str(Path(config_path).resolve()) if config_path else None
    result = train_eval(config_path=path, overrides=list(overrides))
    logging.getLogger("prefect").setLevel(logging.WARNING)  # keeps the server's shutdown line after the summary quiet
    return result
