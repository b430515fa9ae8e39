"""prefect.yaml: every deployment's entrypoint imports as a flow and takes every parameter it is given."""

import inspect
from pathlib import Path

import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_the_three_deployments_are_declared_on_a_process_pool():
    deployments = {d["name"]: d for d in SPEC["deployments"]}
    assert set(deployments) == {"train-eval", "evaluate", "promote"}
    assert [s["cron"] for s in deployments["train-eval"]["schedules"]] == ["0 2 * * *"]
    assert "config_path" in deployments["train-eval"]["parameters"]
    for d in deployments.values():
        assert d["work_pool"]["name"] == "gspo-process"
    step = SPEC["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $GSPO_PROJECT_DIR }}"


def test_entrypoints_import_and_take_their_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, as the worker runs them
    for d in SPEC["deployments"]:
        path, name = d["entrypoint"].split(":")
        assert (ROOT / path).is_file(), d["entrypoint"]
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        assert isinstance(flow, Flow), d["entrypoint"]
        accepted = inspect.signature(flow.fn).parameters
        missing = set(d.get("parameters") or {}) - set(accepted)
        assert not missing, f"{d['name']}: {sorted(missing)} not in {name}{inspect.signature(flow.fn)}"
        # A value prefect.yaml gives must also validate against the flow's parameter schema.
        flow.validate_parameters(d.get("parameters") or {})
