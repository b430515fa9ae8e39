"""Two gloo ranks on the CPU follow the single-process trajectory."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import rewards
from gspo.config import load_config
from gspo.data import prepare_splits
from gspo.tiny import save_tiny
from gspo.trainer import train

# Loss and weights agree to float32 reduction-order noise: gradients are summed in another order across ranks.
TOL = 1e-5
CFG = ["train.steps=3", "gspo.prompts_per_step=4", "gspo.group_size=4", "gspo.max_new_tokens=4",
       "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false", "train.threads=1",
       "data.eval_size=20", "optim.lr=3e-3", "optim.optimizer=adamw", "gspo.num_minibatches=4"]


@rewards.register("test_dist_even_length")
def _even_length(completion, example):
    return rewards.RewardResult(float(len(completion) % 2 == 0))


def _run(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, CFG)
    s = prepare_splits(cfg)
    tr = [dataclasses.replace(e, task="test_dist_even_length") for e in s.train]
    train(cfg, model_dir, tr, s.held_out, out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    model_dir = str(save_tiny(tmp_path / "tiny", seed=0))
    _run(0, 1, 0, model_dir, str(tmp_path / "one"))
    mp.spawn(_run, args=(2, _free_port(), model_dir, str(tmp_path / "two")), nprocs=2, join=True)

    one, two = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    assert any(m["clip_frac"] > 0 for m in one), "the run must exercise clipped updates"
    for a, b in zip(one, two):
        # Same completions and rewards: sampling noise is per completion, not per batch or rank.
        for key in ["reward_mean", "reward_std", "completion_len_mean", "zero_std_group_frac", "advantage_std"]:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ["loss", "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "entropy"]:
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), key
        assert a["clip_frac"] == pytest.approx(b["clip_frac"], abs=1e-6)
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    w0 = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    norm = lambda d: sum(float(v.double().pow(2).sum()) for v in d.values()) ** 0.5
    moved = norm({k: w1[k] - w0[k] for k in w1})
    # Adam divides by sqrt(v): float noise in near-zero gradients becomes steps of up to ~lr, so the weights
    # are compared relative to how far training moved them.
    assert norm({k: w1[k] - w2[k] for k in w1}) < 1e-2 * moved


@pytest.mark.slow
def test_torchrun_launches_the_cli(tmp_path):
    """The documented launch: torchrun over `gspo train`, rank 0 writing the checkpoint and the summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "gspo_cli", "train", "--output", str(tmp_path / "run")] + sum((["--set", c] for c in CFG), [])
    proc = subprocess.run(cmd + ["--set", "train.steps=2"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "run" / "train" / "final" / "model.safetensors").exists()
    assert len(_metrics(tmp_path / "run" / "train" / "metrics.jsonl")) == 2
    assert torch.isfinite(torch.tensor([m["loss"] for m in _metrics(tmp_path / "run" / "train" / "metrics.jsonl")
                                        if "loss" in m] or [0.0])).all()
