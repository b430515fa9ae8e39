"""Stages 4 and 9: the checkpoint as a version of an MLflow registered model, and the promotion gate."""
from __future__ import annotations

import fcntl
import importlib.metadata
import subprocess
from pathlib import Path

import mlflow.artifacts
from mlflow import MlflowClient
from prefect import runtime, task

from gspo.resolve import dir_hash
from tasks.common import CACHE, build, output_dir

PROJECT = Path(__file__).resolve().parents[1]
RETRY = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}  # a busy database or tracking server


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def code_version() -> str:
    """The project's git commit (with -dirty for uncommitted changes), else the installed package version."""
    try:
        sha = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(PROJECT), "diff", "--quiet", "HEAD", "--"], timeout=10).returncode
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return importlib.metadata.version("gspo-pipeline")


def aliases(c: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when the model does not exist yet)."""
    found = c.search_registered_models(f"name = '{name}'")
    return {k: str(v) for k, v in found[0].aliases.items()} if found else {}


@task(name="register-checkpoint", cache_policy=CACHE - "lineage" - "run_id", persist_result=True,
      result_serializer="json", **RETRY)
def register_checkpoint(tracking_uri: str, name: str, checkpoint: dict, lineage: dict, run_id: str, root: str) -> dict:
    """{"name", "version", "source"}: `checkpoint` ({"dir", "hash"}) logged as the MLflow run's `checkpoint`
    artifacts and registered as a version of `name`, tagged with its lineage and aliased `candidate`.
    The same checkpoint registered again (its hash in the `checkpoint_hash` tag) keeps its one version."""
    c = client(tracking_uri)
    # One registration at a time per artifact root, so two runs of one config cannot both miss the search.
    with open(Path(root) / ".registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not c.search_registered_models(f"name = '{name}'"):
            c.create_registered_model(name, description="GSPO checkpoints; alias champion is the promoted one")
        found = c.search_model_versions(f"name = '{name}' and tags.checkpoint_hash = '{checkpoint['hash']}'")
        if found:
            v = min(found, key=lambda mv: int(mv.version))
        else:
            c.log_artifacts(run_id, checkpoint["dir"], "checkpoint")
            tags = {**{k: str(x) for k, x in lineage.items()}, "checkpoint_hash": checkpoint["hash"],
                    "prefect_flow_run_id": str(runtime.flow_run.id)}
            v = c.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id, tags=tags)
    c.set_registered_model_alias(name, "candidate", v.version)
    return {"name": name, "version": str(v.version), "source": v.source}


@task(name="promotion-gate", cache_policy=CACHE, persist_result=True, result_serializer="json", **RETRY)
def promotion_gate(tracking_uri: str, name: str, version: str, scores: dict | None, metric: str,
                   min_delta: float, eval_hash: str = "") -> dict:
    """Moves alias `champion` to `version` when its trained score on `metric` beats the champion's by more
    than `min_delta`, and records the decision and its reason as the version's `promotion` tag.

    `scores` ({task: {"base", "trained"}}) are first written to the version as `score.<task>` tags (and
    `base_score.<task>`); None reads them from the tags. {"promoted", "reason", "champion", ...}."""
    c = client(tracking_uri)
    if scores is not None:
        for t, s in scores.items():
            c.set_model_version_tag(name, version, f"score.{t}", str(s["trained"]))
            c.set_model_version_tag(name, version, f"base_score.{t}", str(s["base"]))
        c.set_model_version_tag(name, version, "eval_hash", eval_hash)
    cand = c.get_model_version(name, version)
    if f"score.{metric}" not in cand.tags:
        raise ValueError(f"{name} version {version} has no score.{metric} tag: evaluate it on {metric} first")
    score = float(cand.tags[f"score.{metric}"])
    champion = aliases(c, name).get("champion")
    champ_score = None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion == version:
        promoted, reason = False, f"version {version} is already the champion"
    else:
        champ = c.get_model_version(name, champion)
        if f"score.{metric}" not in champ.tags:
            promoted, reason = True, f"champion version {champion} has no {metric} score"
        else:
            champ_score = float(champ.tags[f"score.{metric}"])
            delta = score - champ_score
            promoted = delta > min_delta
            reason = (f"{metric} {score:.4f} vs champion version {champion} {champ_score:.4f}: delta {delta:+.4f} "
                      f"{'>' if promoted else '<='} gate_min_delta {min_delta}")
            if champ.tags.get("eval_hash") != cand.tags.get("eval_hash"):
                reason += " (the two were scored with different eval settings)"
    if promoted:
        c.set_registered_model_alias(name, "champion", version)
        champion = version
    c.set_model_version_tag(name, version, "promotion", ("promoted: " if promoted else "not promoted: ") + reason)
    return {"promoted": promoted, "reason": reason, "champion": champion, "metric": metric, "score": score,
            "champion_score": champ_score}


def resolve_version(c: MlflowClient, name: str, version_or_alias: str) -> str:
    """A version number from "3" or an alias such as "champion"."""
    if version_or_alias.isdigit():
        return version_or_alias
    found = aliases(c, name)
    if version_or_alias not in found:
        raise ValueError(f"registered model {name!r} has no alias {version_or_alias!r} (aliases: {found or 'none'})")
    return found[version_or_alias]



@task(name="fetch-version", cache_policy=CACHE, persist_result=True, result_serializer="json", **RETRY)
def fetch_version(tracking_uri: str, name: str, version: str, checkpoint_hash: str, root: str) -> dict:
    """{"dir", "hash"}: a registered version's files downloaded into the artifact root (once per version)."""
    def make(work: Path) -> dict:
        source = client(tracking_uri).get_model_version(name, version).source
        dest = work / "model"
        dest.mkdir()
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=tracking_uri)
        found = [p for p in dest.rglob("config.json")]
        model_dir = found[0].parent if found else dest
        h = dir_hash(model_dir)
        if checkpoint_hash and h != checkpoint_hash:
            raise ValueError(f"{name} version {version}: downloaded files hash to {h[:16]}, "
                             f"its checkpoint_hash tag says {checkpoint_hash[:16]}")
        return {"dir": str(model_dir), "hash": h}

    return build(output_dir(root, "registry"), make)
