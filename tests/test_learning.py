"""GSPO must learn: the demo setup, shortened, raises test accuracy over the warm-started model.

The run is bench/learning.py's `--short` configuration, done by the same function, so the table that
benchmark prints for train seeds 0-4 under every CPU kernel set (bench/README.md) is this test's margin:
the warm start stopped at its held-back reward, GSPO, then both models scored on the arithmetic test
problems, which neither stage trains on (the trained model as the pipeline registers it: the checkpoint with
the best held-out reward).
"""

import json

import pytest

from gspo.config import load_config

pytestmark = pytest.mark.slow  # learns to a target: minutes of training


def test_gspo_raises_held_out_accuracy(tmp_path, load_bench):
    bench = load_bench("learning")
    run = bench.worker(bench.SHORT + ["train.seed=0", *bench.RUN], str(tmp_path))
    print(f"test accuracy {run['before']:.3f} -> {run['after']:.3f} (warm start: {run['warm_start_steps']} steps)")
    cfg = load_config(bench.DEMO, bench.SHORT)
    assert run["warm_start_steps"] < cfg.warm_start.steps, "the warm start never reached warm_start.stop_reward"
    assert run["n"] == cfg.eval.limit
    assert run["gain"] >= bench.REQUIRED["short"], run


def test_stop_reward_with_too_few_examples_to_hold_any_back_trains_on_them_all(tmp_path):
    from gspo.data import prepare_splits
    from gspo.sft import warm_start
    from gspo.tiny import save_tiny

    cfg = load_config(None, ["warm_start.steps=3", "warm_start.stop_reward=0.5", "train.threads=1"])
    out = warm_start(cfg, save_tiny(tmp_path / "base"), prepare_splits(cfg).warm_start[:3], tmp_path / "ws")
    meta = json.loads((out / "gspo_meta.json").read_text())
    assert meta == {"warm_start_steps": 3, "warm_start_reward": None, "stopped": None}
