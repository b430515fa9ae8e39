"""Durable, verified, resumable checkpoints: weights loadable by transformers, plus optimizer, schedule, RNG and
loop state.

A checkpoint directory is written aside (`.<name>-*`), a manifest of SHA-256 checksums is written last, every
file is fsynced, and only then is the directory renamed into place (and its parent fsynced): gspo.io.atomic_dir.
On resume the newest checkpoint whose files match their manifest is used; one that does not (truncated, emptied,
bit-flipped, its manifest missing) is set aside under `<name>.corrupt-<time>`, never deleted, with a one-line
warning.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gspo import distributed
from gspo.io import atomic_dir, atomic_file
from gspo.models import save_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_STEP = "step-"
MANIFEST = "checksums.json"


class CorruptCheckpoint(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(d: Path) -> None:
    """Checksums of every file of d, written last (gspo.io.atomic_dir then fsyncs it all before the rename)."""
    manifest = {
        str(f.relative_to(d)): {"sha256": _sha256(f), "bytes": f.stat().st_size}
        for f in sorted(p for p in d.rglob("*") if p.is_file())
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify(d: Path) -> None:
    """Raise CorruptCheckpoint naming the first file of d that does not match its manifest."""
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{d}: no readable {MANIFEST} ({type(e).__name__})") from None
    for rel, want in manifest.items():
        f = d / rel
        if not f.is_file():
            raise CorruptCheckpoint(f"{d}: {rel} is missing")
        if f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
            raise CorruptCheckpoint(f"{d}: {rel} does not match its checksum")


def _save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, weights: dict | None) -> None:
    """The model as transformers saves it; `weights`, when given, is its whole state dict gathered from the ranks
    of a sharded model (whose own parameters are shards)."""
    if weights is None:
        save_model(model, tokenizer, out)
    else:
        model.save_pretrained(out, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out)


def save_weights(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, meta: dict, weights: dict | None = None
) -> Path:
    with atomic_dir(out) as tmp:
        _save_model(model, tokenizer, tmp, weights)
        (tmp / "gspo_meta.json").write_text(json.dumps(meta))
        _write_manifest(tmp)
    return out


def save(
    out_dir: Path,
    step: int,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    rng: dict,
    keep: int,
    weights: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """A resumable checkpoint. A sharded model passes its whole weights and optimizer state gathered from the ranks
    (gspo.distributed.full_model_state / full_optimizer_state), so the files are what one process would write."""
    final = out_dir / "checkpoints" / f"{_STEP}{step:08d}"
    with atomic_dir(final) as tmp:
        _save_model(model, tokenizer, tmp / "model", weights)
        saved = {
            "optimizer": opt.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": sched.state_dict(),
            "state": dict(state),
            "rng": rng,
        }
        if _is_peft(model):  # model/ holds merged weights; resuming needs the adapter itself
            saved["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(saved, tmp / "trainer_state.pt")
        _write_manifest(tmp)
    for old in all_steps(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint of step %d written to %s", step, final)
    return final


def all_steps(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(_STEP) and "." not in p.name)


def latest_intact(out_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are set aside with a warning."""
    for ckpt in reversed(all_steps(out_dir)):
        try:
            verify(ckpt)
            return ckpt
        except CorruptCheckpoint as e:
            aside = ckpt.with_name(f"{ckpt.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(ckpt, aside)
            log.warning("%s; set aside as %s, resuming from an older checkpoint if there is one", e, aside.name)
    return None


def remove_unfinished(out_dir: Path) -> list[Path]:
    """Delete directories a killed writer left behind (`.step-*`, `.best-*`, `.final-*`, `.*.old-*`): only ever
    partial copies. Call it holding the output directory's lock."""
    out_dir = Path(out_dir)
    gone = []
    for parent in (out_dir, out_dir / "checkpoints"):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.is_dir() and p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)
                    gone.append(p)
    return gone


def load(
    ckpt: Path, model: PreTrainedModel, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> dict:
    """Weights, optimizer and schedule from a checkpoint, whichever sharding wrote it; a sharded model takes its
    shards of the whole tensors (every rank reads the files, memory-mapped)."""
    sharded = distributed.is_sharded(model)
    # weights_only=False: the file holds Python RNG state and is written by this trainer only (and verified).
    saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=sharded)
    if "trainable" in saved:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                params[name].copy_(value)
    else:
        _load_full_weights(model, ckpt / "model")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt.load_state_dict(distributed.local_optimizer_state(saved["optimizer"], trainable))
    sched.load_state_dict(saved["scheduler"])
    return saved


def _is_peft(model: PreTrainedModel) -> bool:
    return hasattr(model, "merge_and_unload")


def _load_full_weights(model: PreTrainedModel, model_dir: Path) -> None:
    """Copy the saved safetensors shards into the live model, so the optimizer keeps its parameter objects."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if distributed.is_sharded(model):
        missing, unexpected = distributed.load_full_model_state(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False) and k.startswith("lm_head")}
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{model_dir}: checkpoint does not match the model "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def metrics_line(m: dict) -> str:
    """One strict-JSON line: non-finite numbers (a skipped update's grad norm) become null, never bare NaN."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to `step`, the checkpoint resumed from. A torn last line (a write cut short by a
    full disk or a kill) is dropped: it comes after the checkpoint. A bad line before the end is an error."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    keep = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            if i == len(lines):  # no newline after it: the append never finished
                break
            raise ValueError(f"{path}:{i}: not a JSON metrics line; remove it or start in a new directory") from None
        if row["step"] <= step:
            keep.append(raw.decode() + "\n")
    with atomic_file(path) as f:
        f.writelines(keep)


class RunLock:
    """An exclusive lock on a training output directory, held while training runs; released by the kernel when the
    process dies. A second trainer on the same directory gets a one-line error naming the holder's pid."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"{self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it or train into another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
