"""GSPO must learn: the demo setup, shortened, raises test accuracy over the warm-started model.

Runs the `gspo train` command on configs/demo.yaml with fewer and smaller steps (about 2 minutes of CPU), then
scores the warm-started and the trained model on the arithmetic test problems, which neither stage trains on.
"""

import json
from pathlib import Path

import pytest

from gspo.config import load_config
from gspo.evaluate import evaluate_task
from gspo_cli import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SHORT = [
    "train.steps=150",
    "gspo.prompts_per_step=32",
    "gspo.num_minibatches=2",
    "data.eval_size=100",
    "eval.limit=100",
    "train.eval_every=50",
    "train.checkpoint_every=0",
    "train.progress=false",
]

pytestmark = pytest.mark.slow  # learns to a target: minutes of training


def test_gspo_raises_held_out_accuracy(tmp_path, capsys):
    assert (
        main(["train", "--config", str(DEMO), "--output", str(tmp_path)] + [a for s in SHORT for a in ("--set", s)])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = load_config(DEMO, SHORT)
    meta = json.loads((tmp_path / "warm_start" / "gspo_meta.json").read_text())
    before = evaluate_task(tmp_path / "warm_start", "arithmetic", cfg)
    after = evaluate_task(result["final"], "arithmetic", cfg)
    print(f"warm start {meta}; test accuracy {before['score']:.3f} -> {after['score']:.3f}")
    assert before["n"] == after["n"] == 100
    assert meta["warm_start_steps"] < cfg.warm_start.steps, "the warm start never reached warm_start.stop_reward"
    assert after["score"] >= before["score"] + 0.10, (before, after)


def test_stop_reward_with_too_few_examples_to_hold_any_back_trains_on_them_all(tmp_path):
    from gspo.data import prepare_splits
    from gspo.sft import warm_start
    from gspo.tiny import save_tiny

    cfg = load_config(None, ["warm_start.steps=3", "warm_start.stop_reward=0.5", "train.threads=1"])
    out = warm_start(cfg, save_tiny(tmp_path / "base"), prepare_splits(cfg).warm_start[:3], tmp_path / "ws")
    meta = json.loads((out / "gspo_meta.json").read_text())
    assert meta == {"warm_start_steps": 3, "warm_start_reward": None, "stopped": None}
