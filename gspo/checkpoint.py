"""Atomic, resumable checkpoints: weights loadable by transformers, plus optimizer, schedule, RNG and loop state."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gspo.models import save_model

_STEP = "step-"


def _atomic_dir(final: Path):
    """A temporary sibling directory that replaces `final` only once fully written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def _commit(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(model, tokenizer, out: Path, meta: dict) -> Path:
    tmp = _atomic_dir(out)
    try:
        save_model(model, tokenizer, tmp)
        (tmp / "gspo_meta.json").write_text(json.dumps(meta))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save(out_dir: Path, step: int, model, tokenizer, opt, sched, state: dict, rng: dict, keep: int) -> Path:
    final = out_dir / "checkpoints" / f"{_STEP}{step:08d}"
    tmp = _atomic_dir(final)
    try:
        save_model(model, tokenizer, tmp / "model")
        saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": dict(state), "rng": rng}
        if _is_peft(model):  # model/ holds merged weights; resuming needs the adapter itself
            saved["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(saved, tmp / "trainer_state.pt")
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in all_steps(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_steps(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(_STEP) and (p / "trainer_state.pt").exists())


def latest(out_dir: Path) -> Path | None:
    steps = all_steps(out_dir)
    return steps[-1] if steps else None


def load(ckpt: Path, model, opt, sched) -> dict:
    # weights_only=False: the file holds Python RNG state and is written by this trainer only.
    saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if "trainable" in saved:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                params[name].copy_(value)
    else:
        _load_full_weights(model, ckpt / "model")
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return saved


def _is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload")


def _load_full_weights(model, model_dir: Path) -> None:
    """Copy the saved safetensors shards into the live model, so the optimizer keeps its parameter objects."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False) and k.startswith("lm_head")}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{model_dir}: checkpoint does not match the model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log matches the weights."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
