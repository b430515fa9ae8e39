"""Stages 5-7: one model scored on one evaluation task (sandboxed HumanEval, SymPy-checked GSM8K,
HellaSwag log-likelihood, arithmetic exact match)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gspo.config import config_from_dict
from gspo.evaluate import evaluate_task, source_path
from tasks.common import CACHE, FilesRead, Progress, build, cached, output_dir, transient


def _eval_file(inputs: dict) -> list:
    return [source_path(inputs["task_name"], config_from_dict(inputs["cfg"]))]


@task(
    name="evaluate",
    task_run_name="evaluate-{task_name}-{label}",
    cache_policy=cached("eval", CACHE - "model_dir" - "label" - "progress" + FilesRead(files=_eval_file)),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
)
def evaluate(
    cfg: dict, model_dir: str, model_hash: str, task_name: str, root: str, label: str = "", progress: bool = True
) -> dict:
    """{"score", "n", task metrics, "predictions"} of the weights in model_dir on one task. `cfg` holds only
    what the evaluation reads (gspo.task_table.evaluation_reads), so pointing another task at a new file leaves
    this task's scores cached. The key holds the weights' content hash, not where they are, so the same weights
    are scored once whichever flow run asks (a registered version downloaded by the evaluate flow reuses the
    train-eval score)."""
    c = config_from_dict(cfg)

    def make(work: Path) -> dict:
        shown = None

        def on_progress(done: int, total: int) -> None:
            nonlocal shown
            shown = shown or Progress(total, f"evaluate {task_name} {label}".strip(), show=progress)
            shown.update(done)

        metrics = evaluate_task(model_dir, task_name, c, work / "predictions.jsonl", on_progress)
        if shown is not None:
            shown.close()
        return {**metrics, "predictions": str(work / "predictions.jsonl")}

    return build(output_dir(root, "eval"), make)
