"""Files that appear whole or not at all, and JSONL that names the file and line of a bad row.

`atomic_file` and `atomic_dir` write into a private sibling, fsync it, rename it into place and fsync the
parent directory, so a crash (or a full disk) leaves either the old content or the new, never a half; a
reader never trusts something half-written. `read_jsonl` is the one JSONL reader: every error is one line
that starts with `file:line`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_file(p) as f: f.write(...)`: p holds the new content once the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """`with atomic_dir(d) as work: ...write into work...`: work is renamed to d once the block ends without
    error and removed when it raises. An existing d is replaced, or with replace=False kept (the first of
    two writers of the same content wins)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield work
        commit_dir(work, final, replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def commit_dir(work: Path, final: Path, replace: bool = True) -> None:
    """Make a fully written directory durable and rename it to `final`."""
    for root, _dirs, files in os.walk(work):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))
    old = None
    if final.exists():
        if not replace:
            shutil.rmtree(work)
            return
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.rename(work, final)
    except OSError:
        if replace or not final.exists():  # with replace=False, another writer got there first
            raise
        shutil.rmtree(work)
        return
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, row) for each non-blank line of a JSONL file (gzip when it ends in .gz); `where` is
    "file:line". A line that is not UTF-8, not JSON, or not a JSON object raises ValueError naming it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so a column past the end is on this line
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
