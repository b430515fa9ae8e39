"""The one task table: what each task name means to every part of the project.

A row says where a task's examples come from (`data.source` for training, `eval.tasks` for evaluation),
which reward judges a completion, how evaluation scores a model on it, which config fields that evaluation
reads (so a cached score moves only with them), and how many completions its reward judges at once. The
config's choices, the data loaders, the evaluation, the reward lookups and the pipeline's cache keys all
read this table; adding a task is adding a row (plus its loader and its reward).

Rows name their loaders as "module:function" strings: this module is imported by gspo.config, so it
imports nothing itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    name: str
    reward: str | None  # the rewards registry name; None: data.reward names it (custom data)
    # How evaluation scores a model: "generate" (greedy completions judged by the reward), "code" (sampled
    # programs run against the problem's tests in the sandbox, pass@k), "choice" (log-likelihood of each
    # ending). None: training data only.
    evaluation: str | None
    loader: str | None  # "module:function" taking (path, split): a local file, or the hub when path is None
    eval_split: str | None = None
    eval_path: str | None = None  # the eval.* field naming its local evaluation file
    reads: dict[str, list[str]] = field(default_factory=dict)  # config fields its evaluation reads beyond EVAL_READS
    # completions its reward judges at once in training (threads: sandboxed programs wait on processes)
    workers: int = 1
    meaning: str = ""  # what its evaluation score is, for reports; {n} is the number of examples scored

    def load(self) -> Callable:
        if self.loader is None:
            raise ValueError(f"task {self.name!r} has no loader")
        module, fn = self.loader.split(":")
        return getattr(importlib.import_module(module), fn)


# In the order the pipeline evaluates them (slowest first).
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "humaneval",
            "humaneval",
            "code",
            "gspo.data:load_humaneval",
            "test",
            "humaneval_path",
            {
                "eval": ["max_new_tokens", "humaneval_samples", "code_timeout", "workers"],
                "gspo": ["temperature", "top_p"],
            },
            workers=4,
            meaning="pass@1: the share of {n} HumanEval problems whose completion passes the problem's "
            "unit tests, run in the sandbox",
        ),
        Task(
            "gsm8k",
            "gsm8k",
            "generate",
            "gspo.data:load_gsm8k",
            "test",
            "gsm8k_path",
            {"eval": ["max_new_tokens"]},
            meaning="accuracy: the share of {n} GSM8K test problems whose final answer equals the reference "
            "(exact rational comparison)",
        ),
        Task(
            "hellaswag",
            "hellaswag",
            "choice",
            "gspo.data:load_hellaswag",
            "validation",
            "hellaswag_path",
            meaning="acc_norm: the share of {n} HellaSwag contexts where the ending with the highest "
            "log-likelihood per character is the right one",
        ),
        Task(
            "arithmetic",
            "arithmetic",
            "generate",
            None,
            "test",
            None,
            {"eval": ["max_new_tokens"], "data": ["seed", "eval_size", "arithmetic_max_operand", "arithmetic_ops"]},
            meaning="exact-match accuracy of the greedy answer on {n} held-out arithmetic problems that no stage "
            "trains on",
        ),
        Task("custom", None, None, "gspo.data:load_custom"),
    ]
}
EVAL_TASKS = tuple(name for name, t in TASKS.items() if t.evaluation)
# What every evaluation reads: the model's loading, prompt formatting, batching and the device.
EVAL_READS = {
    "eval": ["limit", "batch_size"],
    "model": ["dtype", "attn_implementation"],
    "data": ["use_chat_template"],
    "gspo": ["max_prompt_length"],
    "train": ["device", "threads"],
}


def get(name: str, evaluated: bool = False) -> Task:
    """The row of `name`; ValueError naming the choices when there is none (or it is not evaluated)."""
    names = EVAL_TASKS if evaluated else tuple(TASKS)
    if name not in names:
        raise ValueError(
            f"unknown {'evaluation task' if evaluated else 'data source'} {name!r}; choose one of {', '.join(names)}"
        )
    return TASKS[name]


def evaluation_reads(name: str) -> dict[str, list[str]]:
    """{section: [fields]} of the config an evaluation of `name` reads."""
    t = get(name, evaluated=True)
    extra = dict(t.reads)
    if t.eval_path:
        extra["eval"] = [*extra.get("eval", []), t.eval_path]
    return {sec: [*EVAL_READS.get(sec, []), *extra.get(sec, [])] for sec in {**EVAL_READS, **extra}}
