"""What every stage shares: its cache policy, its output directory, the config it reads, its progress display.

A stage's output is one directory `<artifact_root>/<stage>/<key>`, where key is the task run's cache key
(the stage's inputs and source), built in a private directory and renamed into place when complete, with a
manifest of its files. Prefect's result records live beside the artifacts (`<artifact_root>/.prefect-results`),
so deleting the artifact root also forgets the cache that points into it; deleting or damaging one stage's
directory makes that stage a cache miss (see `Intact`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.logging import get_run_logger
from prefect.transactions import get_transaction

from gspo.config import Config
from gspo.io import commit_dir

if TYPE_CHECKING:
    from uuid import UUID

CACHE = INPUTS + TASK_SOURCE  # never RUN_ID: a stage is reused across flow runs
RESULT, MANIFEST, RESULTS = "result.json", "manifest.json", ".prefect-results"
log = logging.getLogger(__name__)


@dataclass
class FilesRead(CachePolicy):
    """Adds a fingerprint of the local files a stage reads (named by `files(inputs)`), so a data file edited
    in place is a cache miss. Files count by content; directories (model weights, too big to hash on every
    run) by the names, sizes and modification times of their files."""

    files: Callable[[dict], list] | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        h = hashlib.sha256()
        for p in [Path(p) for p in (self.files(inputs) if self.files else []) if p]:
            h.update(str(p).encode() + b"\0")
            if p.is_file():
                with open(p, "rb") as fh:
                    for chunk in iter(functools.partial(fh.read, 1 << 20), b""):
                        h.update(chunk)
            elif p.is_dir():
                for f in sorted(q for q in p.rglob("*") if q.is_file()):
                    st = f.stat()
                    h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            else:
                h.update(b"missing")  # the stage itself reports the missing file
        return h.hexdigest()


@dataclass
class Intact(CachePolicy):
    """`policy`'s key, checked before Prefect looks it up: when the stage directory the key names is gone or
    damaged (see `damaged`), the stored result is dropped, so the lookup misses and the stage runs again
    instead of handing later stages paths to files that are not there."""

    policy: CachePolicy | None = None
    stage: str = ""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs) if self.policy else None
        root = Path(inputs["root"]).resolve()
        if key and (root / RESULTS / key).exists() and (why := damaged(root / self.stage / key[:16])):
            log.warning("cached %s result dropped: %s", self.stage, why)
            (root / RESULTS / key).unlink(missing_ok=True)
        return key


def cached(stage_name: str, policy: CachePolicy = CACHE) -> Intact:
    """The cache policy of a stage that writes `<root>/<stage_name>/<key>` (see output_dir)."""
    return Intact(policy=policy, stage=stage_name)


def stage(task, root: str | Path):
    """The task with its persisted results stored under the artifact root."""
    return task.with_options(result_storage=Path(root) / RESULTS)


def pick(cfg: Config, reads: Mapping[str, bool | list[str]]) -> dict:
    """The parts of cfg a stage reads: whole sections (`{"model": True}`) or some fields (`{"train": ["seed"]}`).
    The task rebuilds a Config from them (defaults elsewhere), so its cache key moves only with what it reads.
    train.progress only draws a bar: tasks take it as a separate parameter that is not part of the key."""
    d = cfg.to_dict()
    d["train"].pop("progress")
    return {
        sec: {f: d[sec][f] for f in fields} if isinstance(fields, list) else d[sec] for sec, fields in reads.items()
    }


def transient(task, task_run, state) -> bool:
    """Retry a failed stage unless it failed on bad input, which would fail the same way again."""
    return not isinstance(state.data, (ValueError, KeyError, TypeError, FileNotFoundError))


def damaged(final: Path) -> str | None:
    """Why a stage directory cannot be reused, or None when it is whole: it is gone, unfinished, or a file its
    manifest lists is missing or has another size (stat only: model weights are too big to hash every run)."""
    if not (final / RESULT).is_file():
        return f"{final} is gone" if not final.exists() else f"{final} has no {RESULT}"
    try:
        files = json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{final / MANIFEST} is missing or unreadable"
    for rel, size in files.items():
        try:
            if (final / rel).stat().st_size != size:
                return f"{final / rel} is not the size it was written with"
        except OSError:
            return f"{final / rel} is gone"
    return None


def output_dir(root: str | Path, stage_name: str) -> Path:
    """This task run's output directory, named by its cache key."""
    txn = get_transaction()
    if txn is None or not txn.key:
        raise RuntimeError(f"stage {stage_name}: outputs are named by the cache key; run it as a cached Prefect task")
    return Path(root).resolve() / stage_name / txn.key[:16]


def build(final: Path, make: Callable[[Path], dict], resumable: bool = False) -> dict:
    """The stage result stored in `final`, built first when absent or damaged.

    `make(work)` writes into a private directory and returns a JSON-able result; paths in it that point into
    `work` are rewritten to point into `final`. The manifest (every file and its size) and then the result are
    written last, and `work` is fsynced and renamed to `final` only once complete. A lock per directory makes
    a concurrent run of the same stage wait and reuse the result instead of building it twice. A resumable
    stage keeps its work directory after a failure, so the next attempt resumes from it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        why = damaged(final)
        if why:
            if final.exists():
                log.warning("stage output %s is damaged (%s): building it again", final, why)
                shutil.rmtree(final)
            for stale in final.parent.glob(f".{final.name}-*"):  # left by a killed attempt; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if resumable:
                work = final.parent / f".{final.name}.work"
                work.mkdir(exist_ok=True)
            else:
                work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
            try:
                result = _relocate(make(work), str(work), str(final))
                files = {str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*")) if p.is_file()}
                (work / MANIFEST).write_text(json.dumps(files, indent=1))
                (work / RESULT).write_text(json.dumps(result, indent=1, sort_keys=True))
                commit_dir(work, final)
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
        return new + value[len(old) :]
    return value


class Progress:
    """A long stage's progress: a Prefect progress artifact (updated at most once per percent) and, when
    `show`, a bar on a terminal or, when the output is not one (a worker's log), a plain line every tenth."""

    def __init__(self, total: int, description: str, show: bool = True):
        self.total, self.description, self.percent = max(1, total), description, 0
        # Called from sync code, so the id itself (Prefect types the function for both sync and async callers).
        self.artifact = cast("UUID", create_progress_artifact(0.0, description=description))
        self.bar = self.logger = None
        if show and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, dynamic_ncols=True)
        elif show:
            self.logger = get_run_logger()

    def update(self, done: int, note: str = "") -> None:
        percent = int(100 * done / self.total)
        if percent > self.percent:
            if self.logger is not None and percent // 10 > self.percent // 10:
                self.logger.info(f"{self.description}: {done}/{self.total} ({percent}%) {note}".rstrip())
            self.percent = percent
            update_progress_artifact(self.artifact, float(percent))
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self, outcome: str = "") -> None:
        """`outcome` says why the work ended before `total` (e.g. a stopping rule), so the bar does not look
        like a crash."""
        if self.bar is not None:
            self.bar.close()
        if outcome:
            (self.logger or get_run_logger()).info(f"{self.description}: {outcome}")
