"""Resolve a model name to a local directory: the built-in tiny model, a local path, or a hub snapshot."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from gspo.config import ModelConfig
from gspo.tiny import save_tiny

log = logging.getLogger(__name__)


def resolve_model(cfg: ModelConfig, dest: str | Path) -> Path:
    """A directory that `from_pretrained` loads. `dest` is where the tiny model or a hub download is written."""
    if cfg.name == "tiny":
        return save_tiny(dest, cfg.tiny_seed)
    local = Path(cfg.name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ValueError(f"model.name: {local} is a path but holds no config.json")
        return local
    from huggingface_hub import snapshot_download

    log.info("fetching %s (revision %s) from the hub into %s", cfg.name, cfg.revision or "default", dest)
    try:
        return Path(
            snapshot_download(
                cfg.name,
                revision=cfg.revision,
                local_dir=str(dest),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as e:  # offline, unknown id, gated repo: one line, not a network traceback
        raise ValueError(
            f"model.name: cannot fetch {cfg.name!r} from the hub ({type(e).__name__}); pass a local directory or 'tiny'"
        ) from None


def dir_hash(path: str | Path) -> str:
    """Content hash of every file under a directory (names and bytes), for cache keys and lineage tags."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
