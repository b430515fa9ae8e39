"""Stages 4 and 9: the checkpoint as a version of an MLflow registered model, and the promotion gate.

Both state facts about the registry, which can change under the pipeline (another run moves an alias, the
store is lost or replaced by an empty one), so neither is served from Prefect's cache: every run asks the
registry and acts idempotently (a checkpoint already registered keeps its version, found by its hash).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

import mlflow.artifacts
from prefect import runtime, task
from prefect.cache_policies import NO_CACHE

from gspo.resolve import dir_hash
from tasks.common import CACHE, build, cached, output_dir
from tasks.store import Client, client, lost_a_race, patiently

PROJECT = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """The project's git commit (with -dirty for uncommitted changes), else the installed package version."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(PROJECT), "diff", "--quiet", "HEAD", "--"], timeout=10).returncode
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return importlib.metadata.version("gspo-pipeline")


def aliases(c: Client, name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when the model does not exist yet)."""
    found = c.search_registered_models(f"name = '{name}'")
    return {k: str(v) for k, v in found[0].aliases.items()} if found else {}


def settings_hash(reads: dict) -> str:
    """Hash of the config an evaluation reads (tasks.common.pick of gspo.task_table.evaluation_reads): two
    scores are comparable exactly when these are equal."""
    return hashlib.sha256(json.dumps(reads, sort_keys=True).encode()).hexdigest()[:16]


@task(name="register-checkpoint", cache_policy=NO_CACHE, persist_result=False)
def register_checkpoint(
    tracking_uri: str, wait: float, name: str, checkpoint: dict, lineage: dict, run_id: str, root: str
) -> dict:
    """{"name", "version", "source"}: `checkpoint` ({"dir", "hash"}) logged as the MLflow run's `checkpoint`
    artifacts and registered as a version of `name`, tagged with its lineage and aliased `candidate`.
    The same checkpoint registered again (its hash in the `checkpoint_hash` tag) keeps its one version."""
    c = client(tracking_uri, wait)
    # One registration at a time per artifact root, so two runs of one config cannot both miss the search.
    with open(Path(root) / ".registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not c.search_registered_models(f"name = '{name}'"):
            try:
                c.create_registered_model(name, description="GSPO checkpoints; alias champion is the promoted one")
            except Exception as e:
                if not lost_a_race(e):  # a run on another artifact root made it first
                    raise
        found = c.search_model_versions(f"name = '{name}' and tags.checkpoint_hash = '{checkpoint['hash']}'")
        if found:
            v = min(found, key=lambda mv: int(mv.version))
        else:
            c.log_artifacts(run_id, checkpoint["dir"], "checkpoint")
            tags = {
                **{k: str(x) for k, x in lineage.items()},
                "checkpoint_hash": checkpoint["hash"],
                "prefect_flow_run_id": str(runtime.flow_run.id),
            }
            v = c.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id, tags=tags)
        c.set_registered_model_alias(name, "candidate", v.version)
    return {"name": name, "version": str(v.version), "source": v.source}


def decide(
    version: str,
    score: float,
    champion: str | None,
    champion_score: float | None,
    metric: str,
    min_delta: float,
    same_settings: bool,
) -> tuple[bool, str]:
    """The promotion rule: (promote, reason). The candidate `version` replaces the champion when its score on
    `metric` beats the champion's by more than `min_delta`."""
    if champion is None:
        return True, "no champion yet"
    if champion == version:
        return False, f"version {version} is already the champion"
    if champion_score is None:
        return True, f"champion version {champion} has no {metric} score"
    delta = score - champion_score
    promoted = delta > min_delta
    reason = (
        f"{metric} {score:.4f} vs champion version {champion} {champion_score:.4f}: delta {delta:+.4f} "
        f"{'>' if promoted else '<='} gate_min_delta {min_delta}"
    )
    if not same_settings:
        reason += " (the two were scored with different eval settings)"
    return promoted, reason


@task(name="promotion-gate", cache_policy=NO_CACHE, persist_result=False)
def promotion_gate(
    tracking_uri: str,
    wait: float,
    name: str,
    version: str,
    scores: dict | None,
    metric: str,
    min_delta: float,
    settings: dict[str, str] | None,
    root: str,
) -> dict:
    """Applies `decide` to `version` and the registry's champion as they are now, moves alias `champion` when
    it says so, and records the decision and its reason as the version's `promotion` tag (a version that is
    already the champion keeps the tag that says why it became one).

    `scores` ({task: {"base", "trained", ...}}) and `settings` ({task: settings_hash}) are first written to the
    version as `score.<task>`, `base_score.<task>` and `eval_settings.<task>` tags; None reads them from the
    tags. {"promoted", "reason", "champion", "candidate", "metric", "score", "champion_score"}."""
    c = client(tracking_uri, wait)
    for t, s in (scores or {}).items():
        c.set_model_version_tag(name, version, f"score.{t}", str(s["trained"]))
        c.set_model_version_tag(name, version, f"base_score.{t}", str(s["base"]))
    for t, h in (settings or {}).items():
        c.set_model_version_tag(name, version, f"eval_settings.{t}", h)
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # read, decide and move the alias as one step against a concurrent gate
        cand = c.get_model_version(name, version)
        if f"score.{metric}" not in cand.tags:
            raise ValueError(f"{name} version {version} has no score.{metric} tag: evaluate it on {metric} first")
        score = float(cand.tags[f"score.{metric}"])
        champion = aliases(c, name).get("champion")
        champ_tags = c.get_model_version(name, champion).tags if champion not in (None, version) else {}
        champ_score = float(champ_tags[f"score.{metric}"]) if f"score.{metric}" in champ_tags else None
        same = champ_tags.get(f"eval_settings.{metric}") == cand.tags.get(f"eval_settings.{metric}")
        promoted, reason = decide(version, score, champion, champ_score, metric, min_delta, same)
        if promoted:
            c.set_registered_model_alias(name, "champion", version)
            champion = version
        if promoted or champion != version:
            c.set_model_version_tag(
                name, version, "promotion", ("promoted: " if promoted else "not promoted: ") + reason
            )
    return {
        "promoted": promoted,
        "reason": reason,
        "champion": champion,
        "candidate": aliases(c, name).get("candidate"),
        "metric": metric,
        "score": score,
        "champion_score": champ_score,
    }


def resolve_version(c: Client, name: str, version_or_alias: str) -> str:
    """A version number from "3" or an alias such as "champion"."""
    if version_or_alias.isdigit():
        return version_or_alias
    found = aliases(c, name)
    if version_or_alias not in found:
        raise ValueError(f"registered model {name!r} has no alias {version_or_alias!r} (aliases: {found or 'none'})")
    return found[version_or_alias]


@task(
    name="fetch-version", cache_policy=cached("registry", CACHE - "wait"), persist_result=True, result_serializer="json"
)
def fetch_version(tracking_uri: str, wait: float, name: str, version: str, checkpoint_hash: str, root: str) -> dict:
    """{"dir", "hash"}: a registered version's files downloaded into the artifact root (once per version)."""

    def make(work: Path) -> dict:
        source = client(tracking_uri, wait).get_model_version(name, version).source
        dest = work / "model"
        dest.mkdir()
        patiently(
            tracking_uri,
            wait,
            mlflow.artifacts.download_artifacts,
            artifact_uri=source,
            dst_path=str(dest),
            tracking_uri=tracking_uri,
        )
        found = list(dest.rglob("config.json"))
        model_dir = found[0].parent if found else dest
        h = dir_hash(model_dir)
        if checkpoint_hash and h != checkpoint_hash:
            raise ValueError(
                f"{name} version {version}: downloaded files hash to {h[:16]}, "
                f"its checkpoint_hash tag says {checkpoint_hash[:16]}"
            )
        return {"dir": str(model_dir), "hash": h}

    return build(output_dir(root, "registry"), make)
