"""Stage 1, dataset prep: the configured data split into train / held-out / warm-start snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task

from gspo.config import config_from_dict
from gspo.data import prepare_splits, write_snapshot
from tasks.common import CACHE, FilesRead, build, cached, output_dir

READS = {"data": True, "warm_start": True}
SPLITS = ("train", "held_out", "warm_start")


def _data_files(inputs: dict) -> list:
    return [inputs["cfg"]["data"]["path"]]


@task(
    name="prepare-data",
    cache_policy=cached("data", CACHE + FilesRead(files=_data_files)),
    persist_result=True,
    result_serializer="json",
)
def prepare_data(cfg: dict, root: str) -> dict:
    """{"hash", "train" | "held_out" | "warm_start": {"path", "sha", "n"}}: content-hashed JSONL snapshots;
    `hash` (of the three contents) names the dataset in lineage tags and downstream cache keys."""

    def make(work: Path) -> dict:
        splits = prepare_splits(config_from_dict(cfg))
        out: dict[str, Any] = {}
        h = hashlib.sha256()
        for name in SPLITS:
            examples = getattr(splits, name)
            if examples:  # no warm-start split when the warm start is off
                path, sha = write_snapshot(examples, work / name)
                out[name] = {"path": str(path), "sha": sha, "n": len(examples)}
                h.update(f"{name}:{sha}\n".encode())
        out["hash"] = h.hexdigest()[:16]
        return out

    return build(output_dir(root, "data"), make)
