"""The `gspo` command itself: help pages, one-line errors, a reader that goes away."""

import os
import subprocess
import sys

import pytest

from gspo_cli import build_parser, main

COMMANDS = ["train", "run", "evaluate", "promote", "retry", "worker", "score-math", "eval-code", "config"]


def test_every_subcommand_has_a_description_and_examples():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, p in sub.choices.items():
        page = p.format_help()
        assert p.description and p.description.split()[0] in page, name
        assert "examples:" in page and f"gspo {name}" in page, name


def test_gspo_train_rejects_what_gspo_run_rejects_in_one_line(tmp_path, capsys):
    for argv in (["train", "--output", str(tmp_path / "out")], ["run"]):
        assert main(argv + ["--set", "eval.tasks=[arithmetic,mmlu]"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gspo {argv[0]}: error: invalid config value eval.tasks:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`gspo config --fields | head`: the reader closes the pipe before the command writes; no traceback."""
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(
        [sys.executable, "-m", "gspo_cli", "config", "--fields"], stdout=w, stderr=subprocess.PIPE, timeout=120
    )
    os.close(w)
    assert p.stderr == b"" and p.returncode == 141


@pytest.mark.parametrize(
    "argv", [["run", "--set", "eval.tasks=[gsm8k,arithmetic]", "--set", "eval.gsm8k_path=/nonexistent/test.jsonl"]]
)
def test_a_missing_input_of_a_later_stage_fails_before_anything_starts(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == "gspo run: error: eval.gsm8k_path: /nonexistent/test.jsonl does not exist\n"
