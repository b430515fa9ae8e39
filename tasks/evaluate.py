"""Stages 5-7: one model scored on one evaluation task (sandboxed HumanEval, SymPy-checked GSM8K,
HellaSwag log-likelihood, arithmetic exact match)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from gspo.config import config_from_dict
from gspo.evaluate import evaluate_task, source_path
from tasks.common import CACHE, FilesRead, Progress, build, output_dir, transient

# Per task, the eval fields it reads (beyond limit and batch size), so adding a task to eval.tasks or
# pointing another task at a new file leaves the other tasks' scores cached.
_TASK_FIELDS = {"arithmetic": ["max_new_tokens"], "gsm8k": ["max_new_tokens", "gsm8k_path"],
                "hellaswag": ["hellaswag_path"],
                "humaneval": ["max_new_tokens", "humaneval_path", "humaneval_samples", "code_timeout", "workers"]}
_ARITHMETIC_DATA = ["seed", "eval_size", "arithmetic_max_operand", "arithmetic_ops"]


def reads(task_name: str) -> dict:
    """The config an evaluation of `task_name` reads (see tasks.common.pick)."""
    if task_name not in _TASK_FIELDS:
        raise ValueError(f"eval.tasks: unknown task {task_name!r}; choose from {', '.join(_TASK_FIELDS)}")
    sampled = ["temperature", "top_p"] if task_name == "humaneval" else []
    return {"eval": ["limit", "batch_size", *_TASK_FIELDS[task_name]],
            "model": ["dtype", "attn_implementation"],
            "data": ["use_chat_template", *(_ARITHMETIC_DATA if task_name == "arithmetic" else [])],
            "gspo": ["max_prompt_length", *sampled], "train": ["device", "threads"]}


def _eval_file(inputs: dict) -> list:
    return [source_path(inputs["task_name"], config_from_dict(inputs["cfg"]))]


@task(name="evaluate", task_run_name="evaluate-{task_name}-{label}",
      cache_policy=CACHE - "model_dir" - "label" - "progress" + FilesRead(files=_eval_file), persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=5, retry_condition_fn=transient)
def evaluate(cfg: dict, model_dir: str, model_hash: str, task_name: str, root: str, label: str = "",
             progress: bool = True) -> dict:
    """{"score", "n", task metrics, "predictions"} of the weights in model_dir on one task. The cache key
    holds their content hash, not where they are, so the same weights are scored once whichever flow run
    asks (a registered version downloaded by the evaluate flow reuses the train-eval score)."""
    c = config_from_dict(cfg)

    def make(work: Path) -> dict:
        shown = None

        def on_progress(done: int, total: int) -> None:
            nonlocal shown
            shown = shown or Progress(total, f"evaluate {task_name} {label}".strip(), bar=progress)
            shown.update(done)

        metrics = evaluate_task(model_dir, task_name, c, work / "predictions.jsonl", on_progress)
        if shown is not None:
            shown.close()
        return {**metrics, "predictions": str(work / "predictions.jsonl")}

    return build(output_dir(root, "eval"), make)
