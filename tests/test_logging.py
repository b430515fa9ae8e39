"""Logging: the library only logs (one logger per module, nothing configured on import; ruff's T20 keeps print
out of it), and the `gspo` command configures it: warnings only by default, -v the project's INFO records, -vv
its DEBUG records. The pipeline's side (records in the flow run's log) is checked in test_pipeline.py."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_library_configures_no_logging():
    code = """
import importlib, json, logging, pkgutil
import gspo, rewards
for pkg in (gspo, rewards):
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
ours = {n: x for n, x in logging.Logger.manager.loggerDict.items()
        if n.split(".")[0] in ("gspo", "rewards") and isinstance(x, logging.Logger)}
print(json.dumps({"root": len(logging.getLogger().handlers), "ours": sorted(ours),
                  "configured": sorted(n for n, x in ours.items() if x.handlers or x.level)}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    found = json.loads(p.stdout)
    assert found["root"] == 0 and found["configured"] == []
    assert {"gspo.trainer", "gspo.checkpoint", "gspo.evaluate", "rewards.math", "rewards.sandbox"} <= set(found["ours"])


def _gspo(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gspo_cli", *argv], capture_output=True, text=True, cwd=ROOT)


def test_the_command_is_quiet_by_default_and_says_more_with_v(tmp_path):
    completions = tmp_path / "completions.jsonl"
    completions.write_text('{"completion": "#### 5", "answer": "#### 5"}\n')
    quiet = _gspo("score-math", str(completions))
    assert quiet.returncode == 0 and quiet.stdout.startswith("accuracy=1.0000") and quiet.stderr == ""
    for argv in (["-v", "score-math", str(completions)], ["score-math", "-v", str(completions)]):
        told = _gspo(*argv)
        assert told.returncode == 0 and told.stdout == quiet.stdout  # stdout stays the result
        assert (
            told.stderr.count("\n") == 1 and " INFO rewards.math: " in told.stderr and "1 of 1 correct" in told.stderr
        )


def test_vv_adds_the_projects_debug_records(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/53", "completion": "    return x + y\\n"}\n')
    info, debug = _gspo("-v", "eval-code", str(samples)), _gspo("-vv", "eval-code", str(samples))
    assert info.returncode == debug.returncode == 0 and json.loads(debug.stdout) == {"pass@1": 1.0}
    assert " DEBUG " not in info.stderr
    assert " DEBUG rewards.sandbox: sandbox fork server started" in debug.stderr


def test_the_pipeline_passes_the_librarys_records_from_info_up_to_prefect():
    """Importing tasks (as every flow run does) hands the gspo and rewards loggers to Prefect and sets them to INFO,
    unless the command that imports it chose a level (gspo -v)."""
    code = """
import logging, os, sys
if sys.argv[1] == "chosen":
    logging.getLogger("gspo").setLevel(logging.WARNING)
import tasks
print(logging.getLogger("gspo").level, logging.getLogger("rewards").level, os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"])
"""
    for case, expected in (("default", "20 20 gspo,rewards"), ("chosen", "30 20 gspo,rewards")):
        p = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, cwd=ROOT, check=True)
        assert p.stdout.split() == expected.split(), case
