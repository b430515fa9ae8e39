"""The train-eval flow end to end under a Prefect test server, with a real MLflow store: caching across
runs, what a training change reruns, retrying a failed flow run, registration, promotion, the report,
a stage whose files are gone, a registry that moved on since the last run."""

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import tasks  # noqa: F401  (offline Prefect / MLflow defaults before prefect is imported)

# isort: split
import mlflow.artifacts
import torch
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterLevel,
)
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from transformers import AutoModelForCausalLM

from flows.evaluate import evaluate_model
from flows.promote import promote
from flows.train_eval import train_eval
from gspo.resolve import dir_hash
from tasks import train
from tasks.registry import aliases, register_checkpoint

# A real Prefect server (the test harness's) and real flow runs, some in subprocesses.
pytestmark = pytest.mark.slow

NAME = "gspo-test"
# About 30 s of stages on 2 CPU cores: a short warm start, 3 GSPO steps, 20 evaluation problems.
SMALL = [
    "warm_start.steps=20",
    "warm_start.batch_size=8",
    "train.steps=3",
    "train.eval_every=3",
    "train.threads=1",
    "train.progress=false",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "data.eval_size=20",
    "eval.limit=20",
    "eval.max_new_tokens=4",
    "eval.batch_size=20",
    "optim.lr=1e-3",
    f"pipeline.registered_model={NAME}",
]
FIRST_STAGES = {
    "prepare-data",
    "snapshot-model",
    "warm-start",
    "train-gspo",
    "register-checkpoint",
    "evaluate-arithmetic-base",
    "evaluate-arithmetic-trained",
    "promotion-gate",
    "report",
}
ASKS_THE_REGISTRY = {"register-checkpoint", "promotion-gate"}  # never served from the cache


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A Prefect test server, PREFECT_HOME, artifact root and MLflow store, all private to this module."""
    d = tmp_path_factory.mktemp("pipeline")
    # The library's loggers at INFO, as in a flow run's process (tasks/__init__.py, or gspo run's log file): an
    # in-process `gspo` command of an earlier test may have left them at its default, WARNING.
    levels = {name: logging.getLogger(name).level for name in ("gspo", "rewards")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    with temporary_settings({PREFECT_HOME: d / "prefect"}), prefect_test_harness(server_startup_timeout=180):
        uri = f"sqlite:///{d / 'mlflow.db'}"
        yield {
            "dir": d,
            "uri": uri,
            "base": SMALL + [f"pipeline.artifact_root={d / 'artifacts'}", f"pipeline.mlflow_tracking_uri={uri}"],
            "api_url": PREFECT_API_URL.value(),
        }
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def run(overrides: list[str]):
    return train_eval(config_path=None, overrides=overrides, return_state=True)


def task_states(flow_run_id, since: datetime | None = None, expect: int = 1) -> dict[str, str]:
    """Stage name -> state name of a flow run's task runs (those created after `since`). The server records
    task run states from events, so wait until every expected run has reached a final state."""
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as c:
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            runs = [r for r in runs if since is None or r.created > since]
            if (
                len(runs) >= expect and all(r.state and r.state.is_final() for r in runs)
            ) or time.monotonic() > deadline:
                return {_stage(r.name): r.state.name for r in runs}
            time.sleep(0.5)


def _stage(task_run_name: str) -> str:
    base, _, suffix = task_run_name.rpartition("-")
    return base if len(suffix) == 3 and all(ch in "0123456789abcdef" for ch in suffix) else task_run_name


@pytest.fixture(scope="module")
def first(space):
    state = run(space["base"])
    assert state.is_completed(), state.message
    fid = state.state_details.flow_run_id
    return {"result": state.result(), "flow_run_id": fid, "stages": task_states(fid, expect=len(FIRST_STAGES))}


def test_first_run_computes_every_stage_and_registers_a_champion(space, first):
    r = first["result"]
    assert first["stages"] == dict.fromkeys(FIRST_STAGES, "Completed")
    assert (
        r["registered_model"] == NAME
        and r["version"] == "1"
        and r["promoted"]
        and r["gate_reason"] == "no champion yet"
    )
    assert set(r["scores"]) == {"arithmetic"} and set(r["scores"]["arithmetic"]) == {"base", "trained"}
    c = MlflowClient(space["uri"], space["uri"])
    v = c.get_model_version(NAME, "1")
    assert v.run_id == r["mlflow_run_id"]
    assert v.tags["checkpoint_hash"] == dir_hash(r["checkpoint"])
    assert v.tags["prefect_flow_run_id"] == str(first["flow_run_id"])
    assert v.tags["base_model"].startswith("tiny@") and v.tags["code_version"]
    assert {"dataset_hash", "config_hash", "reference_hash"} <= set(v.tags)
    assert v.tags["promotion"] == "promoted: no champion yet"
    assert v.tags["score.arithmetic"] == str(r["scores"]["arithmetic"]["trained"])


def test_the_mlflow_run_holds_config_metrics_datasets_report_and_checkpoint(space, first):
    r = first["result"]
    c = MlflowClient(space["uri"], space["uri"])
    run_ = c.get_run(r["mlflow_run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.steps"] == "3" and run_.data.params["pipeline.registered_model"] == NAME
    assert run_.data.tags["prefect.flow_run_id"] == str(first["flow_run_id"])
    assert run_.data.tags["version.transformers"] == importlib.metadata.version("transformers")
    assert [m.step for m in c.get_metric_history(run_.info.run_id, "reward_mean")] == [1, 2, 3]
    assert len(c.get_metric_history(run_.info.run_id, "warm_start/sft_loss")) == 20
    delta = r["scores"]["arithmetic"]["trained"] - r["scores"]["arithmetic"]["base"]
    assert run_.data.metrics["eval/arithmetic/delta"] == pytest.approx(delta)
    contexts = {t.value for d in run_.inputs.dataset_inputs for t in d.tags}
    assert contexts == {"train", "held_out", "warm_start"}
    logged = {a.path for a in c.list_artifacts(run_.info.run_id)}
    assert {"config.yaml", "report", "checkpoint"} <= logged
    assert {"report/report.html", "report/report.md", "report/training.png"} <= {
        a.path for a in c.list_artifacts(run_.info.run_id, "report")
    }


def test_the_librarys_log_records_are_in_the_flow_runs_log(first):
    """tasks/ hands the gspo and rewards loggers to Prefect: what the library logs inside a stage is in the flow
    run's log (the UI), beside the stages' own records."""
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as c:
        logs = c.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[first["flow_run_id"]]), level=LogFilterLevel(ge_=logging.INFO)
            )
        )
    scored = [x.message for x in logs if x.name == "gspo.evaluate"]
    assert any(m.startswith("arithmetic: score ") for m in scored), sorted({x.name for x in logs})


def test_report_is_markdown_plus_a_self_contained_html_page(first):
    r = first["result"]
    md, page = Path(r["report"]).read_text(), Path(r["report_html"]).read_text()
    assert "| task | metric | base | GSPO | trained - base |" in md and "| arithmetic | score |" in md
    assert "arithmetic, exact-match accuracy of the greedy answer on 20 held-out arithmetic problems" in md
    assert "![training.png](training.png)" in md and (Path(r["report"]).parent / "training.png").is_file()
    assert f"torch {importlib.metadata.version('torch')}" in md.split("## Versions")[1]
    assert page.count('src="data:image/png;base64,') == 2 and page.count("src=") == 2
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]))
        )
    kinds = {(a.type, a.key) for a in arts}
    assert ("markdown", "gspo-report") in kinds
    progress = [a for a in arts if a.type == "progress"]
    assert {a.description for a in progress} >= {"warm start", "gspo training", "evaluate arithmetic base"}
    assert all(a.data == 100.0 for a in progress)


def test_same_config_twice_is_all_cached_but_what_the_registry_says(space, first):
    state = run(space["base"])
    assert state.is_completed()
    stages = task_states(state.state_details.flow_run_id, expect=len(FIRST_STAGES))
    # The report is rebuilt once: it now says version 1 was already the champion, not that it was promoted.
    fresh = ASKS_THE_REGISTRY | {"report"}
    assert stages == {s: "Completed" if s in fresh else "Cached" for s in FIRST_STAGES}
    r, r1 = state.result(), first["result"]
    assert (r["version"], r["scores"], r["champion"]) == (r1["version"], r1["scores"], "1")
    assert not r["promoted"] and r["gate_reason"] == "version 1 is already the champion"
    assert "not promoted: version 1 is already the champion" in Path(r["report"]).read_text()
    c = MlflowClient(space["uri"], space["uri"])
    assert c.get_model_version(NAME, "1").tags["promotion"] == "promoted: no champion yet"  # kept, not rewritten

    state = run(space["base"])
    stages = task_states(state.state_details.flow_run_id, expect=len(FIRST_STAGES))
    assert stages == {s: "Completed" if s in ASKS_THE_REGISTRY else "Cached" for s in FIRST_STAGES}
    assert state.result()["report"] == r["report"]
    c = MlflowClient(space["uri"], space["uri"])
    run_ = c.get_run(r["mlflow_run_id"])  # a new MLflow run, filled from the cached stages' outputs
    assert r["mlflow_run_id"] != r1["mlflow_run_id"] and run_.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run_.info.run_id, "reward_mean")] == [1, 2, 3]
    assert [str(v.version) for v in c.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_registering_the_same_checkpoint_again_keeps_one_version(space, first):
    r = first["result"]
    checkpoint = {"dir": r["checkpoint"], "hash": dir_hash(r["checkpoint"])}

    @flow
    def register_again() -> dict:  # registration is never cached: the registry's own check keeps one version
        return register_checkpoint(space["uri"], 10, NAME, checkpoint, {}, r["mlflow_run_id"], str(space["dir"]))

    assert register_again()["version"] == "1"
    c = MlflowClient(space["uri"], space["uri"])
    assert len(c.search_model_versions(f"name = '{NAME}' and tags.checkpoint_hash = '{checkpoint['hash']}'")) == 1


def test_champion_loads_back_into_transformers(space, first, tmp_path, monkeypatch):
    c = MlflowClient(space["uri"], space["uri"])
    champion = aliases(c, NAME)["champion"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", space["uri"])  # models:/ URIs resolve through the registry it names
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@champion", dst_path=str(tmp_path))
    assert dir_hash(path) == c.get_model_version(NAME, champion).tags["checkpoint_hash"]
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids).logits.shape[:2] == (1, 3)


def test_evaluating_a_registered_version_reuses_the_scores_of_the_same_weights(space, first):
    state = evaluate_model(model="1", overrides=space["base"], return_state=True)
    assert state.is_completed()
    r = state.result()
    assert r["scores"] == {"arithmetic": {"v1": first["result"]["scores"]["arithmetic"]["trained"]}}
    assert r["version"] == "1" and r["champion"] == "1" and r["promoted"] is None
    stages = task_states(state.state_details.flow_run_id, expect=2)
    assert stages == {"fetch-version": "Completed", "evaluate-arithmetic-v1": "Cached"}


def test_a_training_change_reruns_training_and_after_and_the_gate_can_refuse(space, first):
    # Weight decay moves the weights even in steps where every group's rewards tie, so this is a new checkpoint.
    state = run(space["base"] + ["optim.weight_decay=0.01", "pipeline.gate_min_delta=1.0"])
    assert state.is_completed()
    stages = task_states(state.state_details.flow_run_id, expect=len(FIRST_STAGES))
    cached = {"prepare-data", "snapshot-model", "warm-start", "evaluate-arithmetic-base"}
    assert stages == {s: "Cached" if s in cached else "Completed" for s in FIRST_STAGES}
    r = state.result()
    assert r["version"] == "2" and not r["promoted"] and r["gate_reason"].endswith("<= gate_min_delta 1.0")
    c = MlflowClient(space["uri"], space["uri"])
    assert aliases(c, NAME) == {"candidate": "2", "champion": "1"}
    assert c.get_model_version(NAME, "2").tags["promotion"] == "not promoted: " + r["gate_reason"]

    # The promote flow decides afresh from the recorded scores; a negative margin always promotes.
    out = promote(version="candidate", overrides=space["base"] + ["pipeline.gate_min_delta=-1"])
    assert out["version"] == "2" and out["promoted"] and out["champion"] == "2"
    assert aliases(c, NAME)["champion"] == "2"


def test_a_rerun_after_the_champion_moved_states_the_registry_as_it_is(space, first):
    """The champion moved to version 2 (previous test); rerunning the first config must not replay its cached
    decision ("version 1, promoted, no champion yet")."""
    c = MlflowClient(space["uri"], space["uri"])
    assert aliases(c, NAME)["champion"] == "2"
    state = run(space["base"])
    r = state.result()
    assert r["version"] == "1" and "champion version 2" in r["gate_reason"]
    assert r["champion"] == ("1" if r["promoted"] else "2") == aliases(c, NAME)["champion"]
    assert aliases(c, NAME)["candidate"] == "1"
    decision = ("promoted: " if r["promoted"] else "not promoted: ") + r["gate_reason"]
    assert c.get_model_version(NAME, "1").tags["promotion"] == decision
    assert c.get_run(r["mlflow_run_id"]).data.tags["promotion"].endswith(r["gate_reason"])
    report = Path(r["report"]).read_text()
    assert f"after this run candidate is version 1 and champion is version {r['champion']}" in report
    assert r["gate_reason"] in report


GSM8K_ROWS = [
    '{"question": "Tom has 2 apples and buys 2 more. How many apples?", "answer": "2+2=4\\n#### 4"}',
    '{"question": "What is 3 times 3?", "answer": "3*3=9\\n#### 9"}',
]


def test_a_broken_eval_file_fails_before_the_first_stage(space, first, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(GSM8K_ROWS[0] + "\n{broken\n")
    state = run(space["base"] + ["eval.tasks=[gsm8k,arithmetic]", f"eval.gsm8k_path={data}"])
    assert state.is_failed() and f"{data}:2: invalid JSON" in state.message
    assert task_states(state.state_details.flow_run_id, expect=0) == {}
    state = run(space["base"] + ["eval.tasks=[gsm8k,arithmetic]", f"eval.gsm8k_path={tmp_path / 'missing.jsonl'}"])
    assert state.is_failed() and "eval.gsm8k_path:" in state.message and "missing.jsonl does not exist" in state.message


def test_a_failed_evaluation_is_retried_without_recomputing_finished_stages(space, first, tmp_path, monkeypatch):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(GSM8K_ROWS) + "\n")

    def break_the_file(task, task_run, state):  # an input that changes after the check, while training runs
        data.write_text(GSM8K_ROWS[0] + "\n{broken\n")

    monkeypatch.setattr(train, "train_policy", train.train_policy.with_options(on_completion=[break_the_file]))
    overrides = space["base"] + ["optim.weight_decay=0.02", "eval.tasks=[gsm8k,arithmetic]", f"eval.gsm8k_path={data}"]
    state = run(overrides)
    assert state.is_failed()
    fid = state.state_details.flow_run_id
    before = task_states(fid, expect=5)
    assert before["train-gspo"] == "Completed" and before["evaluate-gsm8k-base"] == "Failed"
    c = MlflowClient(space["uri"], space["uri"])
    [mlrun] = c.search_runs([c.get_experiment_by_name("gspo").experiment_id], f"tags.`prefect.flow_run_id` = '{fid}'")
    assert mlrun.info.status == "FAILED" and f"{data}:2: invalid JSON" in mlrun.data.tags["gspo.end"]

    data.write_text("\n".join(GSM8K_ROWS) + "\n")
    since = datetime.now(UTC)
    env = {**os.environ, "PREFECT_API_URL": space["api_url"], "PREFECT_HOME": str(space["dir"] / "prefect")}
    retry = subprocess.run(
        [sys.executable, "-m", "gspo_cli", "retry", str(fid)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert json.loads(retry.stdout.splitlines()[-1])["flow_run_id"] == str(fid)
    after = task_states(fid, since=since, expect=len(FIRST_STAGES) + 2)
    done_before = {s for s, st in before.items() if st == "Completed"} - ASKS_THE_REGISTRY
    assert done_before and all(after[s] == "Cached" for s in done_before)
    assert after["evaluate-gsm8k-base"] == after["evaluate-gsm8k-trained"] == "Completed"
    [mlrun] = c.search_runs([c.get_experiment_by_name("gspo").experiment_id], f"tags.`prefect.flow_run_id` = '{fid}'")
    assert mlrun.info.status == "FINISHED" and "eval/gsm8k/trained/score" in mlrun.data.metrics


def test_a_stage_whose_files_are_gone_or_damaged_runs_again(space, first):
    r = first["result"]
    shutil.rmtree(space["dir"] / "artifacts" / "report")  # every report, deleted outright
    (Path(r["checkpoint"]) / "model.safetensors").write_bytes(b"")  # damaged in place
    state = run(space["base"])
    assert state.is_completed(), state.message
    stages = task_states(state.state_details.flow_run_id, expect=len(FIRST_STAGES))
    # The damaged checkpoint is trained again (the same seeds give the same weights), so what follows it is
    # scored from the cache again; the report is written again.
    assert stages["train-gspo"] == stages["report"] == "Completed"
    assert stages["prepare-data"] == stages["warm-start"] == stages["evaluate-arithmetic-base"] == "Cached"
    again = state.result()
    assert Path(again["report"]).is_file() and again["checkpoint"] == r["checkpoint"]
    assert (
        dir_hash(again["checkpoint"])
        == MlflowClient(space["uri"], space["uri"]).get_model_version(NAME, again["version"]).tags["checkpoint_hash"]
    )


def test_two_configs_at_once_keep_their_own_artifacts_and_runs(space):
    """Two flow runs with different settings at the same time, as two workers' processes would run
    them, against one Prefect server, one artifact root and one MLflow store."""

    name = "gspo-concurrent"
    lrs = ("7e-4", "9e-4")
    env = dict(os.environ, PREFECT_API_URL=space["api_url"], PYTHONUNBUFFERED="1")
    MlflowClient(space["uri"]).search_experiments()  # an existing store, as in production: created and migrated once
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gspo_cli", "run"]
            + [
                a
                for o in space["base"]
                + [f"pipeline.registered_model={name}", f"optim.lr={lr}", f"warm_start.steps={ws}", "train.steps=2"]
                for a in ("--set", o)
            ],
            cwd=space["dir"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr, ws in zip(lrs, (20, 24))
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["checkpoint"] != results[1]["checkpoint"]
    assert results[0]["mlflow_run_id"] != results[1]["mlflow_run_id"]
    c = MlflowClient(space["uri"])
    for r, lr in zip(results, lrs):
        assert float(c.get_run(r["mlflow_run_id"]).data.params["optim.lr"]) == float(lr)
        # Each checkpoint is intact: its content still has the hash it was registered under.
        assert c.get_model_version(name, r["version"]).tags["checkpoint_hash"] == dir_hash(r["checkpoint"])
    assert {str(v.version) for v in c.search_model_versions(f"name='{name}'")} == {str(r["version"]) for r in results}
    assert len({str(r["version"]) for r in results}) == 2
