"""Stage 3, GSPO training (or the GRPO baseline: the same stage with token-level ratios)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gspo.config import config_from_dict
from gspo.data import read_snapshot
from gspo.resolve import dir_hash
from gspo.trainer import train
from tasks.common import CACHE, Progress, build, cached, output_dir

READS = {"model": True, "data": True, "gspo": True, "optim": True, "train": True}


@task(
    name="train",
    task_run_name="train-{label}",
    cache_policy=cached("train", CACHE - "label" - "progress"),
    persist_result=True,
    result_serializer="json",
)
def train_policy(cfg: dict, reference: dict, data: dict, root: str, label: str = "gspo", progress: bool = True) -> dict:
    """{"checkpoint", "checkpoint_hash", "selected", "metrics", "steps", ...}: trains from the reference
    model on data["train"], keeping the checkpoint with the best held-out reward (the final one when the
    held-out reward is off). A failed or killed attempt resumes from its last checkpoint on the next run."""
    c = config_from_dict(cfg)
    c.train.progress = False  # the stage shows its own progress: a bar on a terminal, log lines elsewhere

    def make(work: Path) -> dict:
        shown = Progress(c.train.steps, f"{label} training", show=progress)
        res = train(
            c,
            reference["dir"],
            read_snapshot(data["train"]["path"]),
            read_snapshot(data["held_out"]["path"]),
            work,
            on_step=lambda m: shown.update(m["step"], f"reward {m.get('reward_mean', float('nan')):.3f}"),
        )
        shown.close()
        ckpt = res.best_dir or res.final_dir
        return {
            "checkpoint": str(ckpt),
            "checkpoint_hash": dir_hash(ckpt),
            "selected": ckpt.name,
            "final": str(res.final_dir),
            "metrics": str(res.metrics_path),
            "steps": res.steps,
            "best_eval": res.best_eval,
            "skipped_updates": res.skipped_updates,
            "stopped_early": res.stopped_early,
        }

    return build(output_dir(root, "train"), make, resumable=True)
