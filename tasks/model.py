"""Stage 2, the base / reference model: an immutable snapshot keyed by its content, and the optional
supervised warm start on top of it (the reference the trained model is compared with)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from prefect import task

from gspo.config import config_from_dict
from gspo.data import read_snapshot
from gspo.resolve import dir_hash, resolve_model
from gspo.sft import warm_start
from tasks.common import CACHE, FilesRead, Progress, build, cached, output_dir

SNAPSHOT_READS = {"model": ["name", "revision", "tiny_seed"]}
WARM_START_READS: dict[str, bool | list[str]] = {
    "model": True,
    "warm_start": True,
    "data": ["use_chat_template"],
    "gspo": ["max_prompt_length", "max_new_tokens"],
    "train": ["seed", "device", "threads"],
}


def _local_model(inputs: dict) -> list:
    name = inputs["cfg"]["model"]["name"]
    return [name] if name != "tiny" and Path(name).expanduser().exists() else []


@task(
    name="snapshot-model",
    cache_policy=cached("model", CACHE + FilesRead(files=_local_model)),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
)
def snapshot_model(cfg: dict, root: str) -> dict:
    """{"dir", "hash", "name", "revision"}: a private copy of the configured model (the built-in tiny model,
    a local directory or a hub download), so later stages never see it change underneath them."""

    def make(work: Path) -> dict:
        m = config_from_dict(cfg).model
        dest = work / "model"
        src = resolve_model(m, dest)
        if src != dest:  # a local directory: copy it, the original may be edited later
            shutil.copytree(src, dest)
        shutil.rmtree(dest / ".cache", ignore_errors=True)  # hub download bookkeeping, not the model
        return {"dir": str(dest), "hash": dir_hash(dest), "name": m.name, "revision": m.revision}

    return build(output_dir(root, "model"), make)


@task(
    name="warm-start",
    cache_policy=cached("warm_start", CACHE - "progress"),
    persist_result=True,
    result_serializer="json",
)
def warm_start_model(cfg: dict, base: dict, examples: dict, root: str, progress: bool = True) -> dict:
    """{"dir", "hash", "metrics"}: the base model after cfg.warm_start.steps supervised steps on the
    warm-start split (`examples` is its snapshot entry from prepare_data)."""
    c = config_from_dict(cfg)
    c.train.progress = False  # the stage shows its own progress: a bar on a terminal, log lines elsewhere

    def make(work: Path) -> dict:
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        w = c.warm_start
        shown = Progress(w.steps, "warm start", show=progress)
        metrics, last = work / "metrics.jsonl", {}
        with open(metrics, "w") as f:

            def on_step(m: dict) -> None:
                f.write(json.dumps(m) + "\n")
                last.update(m)
                shown.update(m["step"], f"held-back reward {last['sft_reward']:.3f}" if "sft_reward" in last else "")

            out = warm_start(c, base["dir"], read_snapshot(examples["path"]), work / "model", on_step=on_step)
        stopped = last.get("step", w.steps) < w.steps
        shown.close(
            f"stopped at step {last['step']} of {w.steps}: the held-back reward {last['sft_reward']:.3f} "
            f"reached warm_start.stop_reward {w.stop_reward}"
            if stopped
            else ""
        )
        return {"dir": str(out), "hash": dir_hash(out), "metrics": str(metrics)}

    return build(output_dir(root, "warm_start"), make)
