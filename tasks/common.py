"""What every stage shares: its cache policy, its output directory, the config it reads, its progress display.

A stage's output is one directory `<artifact_root>/<stage>/<key>`, where key is the task run's cache key
(the stage's inputs and source), built in a private directory and renamed into place when complete. Prefect's
result records live beside the artifacts (`<artifact_root>/.prefect-results`), so deleting the artifact root
also forgets the cache that points into it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.transactions import get_transaction

from gspo.config import Config

CACHE = INPUTS + TASK_SOURCE  # never RUN_ID: a stage is reused across flow runs
RESULT = "result.json"


@dataclass
class FilesRead(CachePolicy):
    """Adds a fingerprint of the local files a stage reads (named by `files(inputs)`), so a data file edited
    in place is a cache miss. Files count by content; directories (model weights, too big to hash on every
    run) by the names, sizes and modification times of their files."""

    files: Callable[[dict], list] | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        h = hashlib.sha256()
        for p in [Path(p) for p in self.files(inputs) if p]:
            h.update(str(p).encode() + b"\0")
            if p.is_file():
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            elif p.is_dir():
                for f in sorted(q for q in p.rglob("*") if q.is_file()):
                    st = f.stat()
                    h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            else:
                h.update(b"missing")  # the stage itself reports the missing file
        return h.hexdigest()


def stage(task, root: str | Path):
    """The task with its persisted results stored under the artifact root."""
    return task.with_options(result_storage=Path(root) / ".prefect-results")


def pick(cfg: Config, reads: dict[str, bool | list[str]]) -> dict:
    """The parts of cfg a stage reads: whole sections (`{"model": True}`) or some fields (`{"train": ["seed"]}`).
    The task rebuilds a Config from them (defaults elsewhere), so its cache key moves only with what it reads.
    train.progress only draws a bar: tasks take it as a separate parameter that is not part of the key."""
    d = cfg.to_dict()
    d["train"].pop("progress")
    return {sec: d[sec] if fields is True else {f: d[sec][f] for f in fields} for sec, fields in reads.items()}


def transient(task, task_run, state) -> bool:
    """Retry a failed stage unless it failed on bad input, which would fail the same way again."""
    return not isinstance(state.data, (ValueError, KeyError, TypeError, FileNotFoundError))


def output_dir(root: str | Path, stage_name: str) -> Path:
    """This task run's output directory, named by its cache key."""
    txn = get_transaction()
    if txn is None or not txn.key:
        raise RuntimeError(f"stage {stage_name}: outputs are named by the cache key; run it as a cached Prefect task")
    return Path(root).resolve() / stage_name / txn.key[:16]


def build(final: Path, make: Callable[[Path], dict], resumable: bool = False) -> dict:
    """The stage result stored in `final`, built first when absent.

    `make(work)` writes into a private directory and returns a JSON-able result; paths in it that point into
    `work` are rewritten to point into `final`, and `work` is renamed to `final` only once complete. A lock
    per directory makes a concurrent run of the same stage wait and reuse the result instead of building it
    twice. A resumable stage keeps its work directory after a failure, so the next attempt resumes from it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if not (final / RESULT).exists():
            if resumable:
                work = final.parent / f".{final.name}.work"
                work.mkdir(exist_ok=True)
            else:
                for stale in final.parent.glob(f".{final.name}-*"):  # left by a killed attempt; we hold the lock
                    shutil.rmtree(stale, ignore_errors=True)
                work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            try:
                result = _relocate(make(work), str(work), str(final))
                (work / RESULT).write_text(json.dumps(result, indent=1, sort_keys=True))
                os.rename(work, final)
            except BaseException:
                if not resumable:
                    shutil.rmtree(work, ignore_errors=True)
                raise
        return json.loads((final / RESULT).read_text())


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value


class Progress:
    """A long stage's progress: a Prefect progress artifact (updated at most once per percent) and,
    when `bar`, a terminal bar."""

    def __init__(self, total: int, description: str, bar: bool = True):
        self.total, self.percent = max(1, total), 0
        self.artifact = create_progress_artifact(0.0, description=description)
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, dynamic_ncols=True)

    def update(self, done: int) -> None:
        percent = int(100 * done / self.total)
        if percent > self.percent:
            self.percent = percent
            update_progress_artifact(self.artifact, float(percent))
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
