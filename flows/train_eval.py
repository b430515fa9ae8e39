"""The main job: dataset prep -> reference model -> GSPO training (and the GRPO baseline) -> registration ->
evaluation of the reference and the trained checkpoints -> promotion gate -> report.

Every file stage is a cached Prefect task (tasks/); a rerun recomputes only the stages whose inputs changed
(or whose output directory is gone). Registration and the gate ask the registry on every run.
`gspo run --config FILE --set k=v` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tasks  # noqa: F401  (offline defaults before prefect is imported, also when loaded as a file)

# isort: split
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from flows.common import check_inputs, eval_settings, summary
from gspo.config import Config, load_config
from gspo.task_table import EVAL_TASKS, evaluation_reads
from tasks import data, evaluate, model, registry, report, tracking, train
from tasks.common import pick, stage
from tasks.store import tracking_uri

LEVEL_NAMES = {"sequence": "GSPO", "sequence_token": "GSPO-token", "token": "GRPO"}


def grpo_config(cfg: Config) -> Config:
    """The GRPO baseline: the same run with token-level ratios and their clip range (0.2)."""
    return dataclasses.replace(
        cfg, gspo=dataclasses.replace(cfg.gspo, importance_sampling_level="token", epsilon_low=None, epsilon_high=None)
    )


def _weights(stage_result: dict) -> dict:
    """What an evaluation keys on: where the weights are and their content hash."""
    return {"dir": stage_result["dir"], "hash": stage_result["hash"]}


@flow(name="train-eval")
def train_eval(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train and evaluate one configuration (a YAML file plus `section.field=value` overrides)."""
    cfg = load_config(config_path, overrides or [])
    check_inputs(cfg)
    p = cfg.pipeline
    root, uri = str(Path(p.artifact_root).resolve()), tracking_uri(p.mlflow_tracking_uri)
    name, progress, wait = p.registered_model, cfg.train.progress, p.mlflow_wait
    ml, run_id = tracking.start_run(cfg, uri, str(runtime.flow_run.id), runtime.flow_run.name)
    error = ""
    try:
        # 1. dataset prep
        snapshots = stage(data.prepare_data, root)(pick(cfg, data.READS), root)
        tracking.log_datasets(ml, run_id, snapshots)
        splits = {"train": snapshots["train"], "held_out": snapshots["held_out"]}

        # 2. base / reference model, with the optional supervised warm start
        base = stage(model.snapshot_model, root)(pick(cfg, model.SNAPSHOT_READS), root)
        reference = base
        if cfg.warm_start.steps:
            reference = stage(model.warm_start_model, root)(
                pick(cfg, model.WARM_START_READS), _weights(base), snapshots["warm_start"], root, progress
            )
            tracking.log_step_metrics(ml, run_id, reference["metrics"], "warm_start/")

        # 3. GSPO training, and the GRPO baseline scored beside it
        runs = {
            "trained": stage(train.train_policy, root)(
                pick(cfg, train.READS), _weights(reference), splits, root, "gspo", progress
            )
        }
        tracking.log_step_metrics(ml, run_id, runs["trained"]["metrics"])
        if p.compare_grpo and cfg.gspo.importance_sampling_level != "token":  # a GRPO run is its own baseline
            runs["grpo"] = stage(train.train_policy, root)(
                pick(grpo_config(cfg), train.READS), _weights(reference), splits, root, "grpo", progress
            )
            tracking.log_step_metrics(ml, run_id, runs["grpo"]["metrics"], "grpo/")
        checkpoints = {label: {"dir": r["checkpoint"], "hash": r["checkpoint_hash"]} for label, r in runs.items()}

        # 4. checkpoint registration (asks the registry every run: see tasks/registry.py)
        trained = runs["trained"]
        lineage = {
            "dataset_hash": snapshots["hash"],
            "config_hash": cfg.section_hash(),
            "base_model": f"{base['name']}@{base['hash'][:16]}",
            "reference_hash": reference["hash"][:16],
            "selected_checkpoint": trained["selected"],
            "code_version": registry.code_version(),
        }
        version = registry.register_checkpoint(uri, wait, name, checkpoints["trained"], lineage, run_id, root)[
            "version"
        ]

        # 5-7. HumanEval, GSM8K, HellaSwag, arithmetic: the reference and each trained model
        results = {}
        for t in sorted(cfg.eval.tasks, key=EVAL_TASKS.index):
            results[t] = {
                label: stage(evaluate.evaluate, root)(
                    pick(cfg, evaluation_reads(t)), weights["dir"], weights["hash"], t, root, label, progress
                )
                for label, weights in {"base": reference, **checkpoints}.items()
            }
        tracking.log_scores(ml, run_id, results)
        scores = {t: {label: m["score"] for label, m in r.items()} for t, r in results.items()}

        # 9. promotion gate, against the champion as the registry holds it now (before the report, so the report
        # can say what it decided and why)
        gate = registry.promotion_gate(
            uri, wait, name, version, scores, p.gate_metric, p.gate_min_delta, eval_settings(cfg), root
        )
        decision = ("promoted to champion: " if gate["promoted"] else "not promoted: ") + gate["reason"]
        get_run_logger().info(f"{name} version {version}: {decision}")

        # 8. report, stating what the registry holds after this run
        names = {"base": "base", "trained": LEVEL_NAMES[cfg.gspo.importance_sampling_level], "grpo": "GRPO"}
        names = {label: names[label] for label in results[p.gate_metric]}
        facts = [
            f"config hash: {cfg.section_hash()}",
            f"dataset hash: {snapshots['hash']}",
            f"base model: {lineage['base_model']}" + (" + warm start" if cfg.warm_start.steps else ""),
            (
                f"registered: {name} version {version}; after this run candidate is version {gate['candidate']} "
                f"and champion is version {gate['champion']}"
            ),
            decision,
        ]
        rep = stage(report.build_report, root)(
            facts, {names[label]: r for label, r in runs.items()}, results, names, tracking.package_versions(), root
        )  # no run ids: it stays cached while the facts (and the versions) hold
        create_markdown_artifact(
            f"{rep['markdown_text']}\nMLflow run `{run_id}`, report `{rep['html']}`\n",
            key="gspo-report",
            description=f"{name} version {version}",
        )
        tracking.log_report(ml, run_id, rep["dir"])
        ml.set_tag(run_id, "promotion", decision)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        tracking.finish(ml, run_id, not error, error)
    return summary(
        str(runtime.flow_run.id),
        name,
        version,
        scores,
        gate,
        run_id,
        report=rep["markdown"],
        report_html=rep["html"],
        checkpoint=trained["checkpoint"],
    )
