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
CFG = [
    "train.steps=3",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.progress=false",
    "train.threads=1",
    "data.eval_size=20",
    "optim.lr=3e-3",
    "optim.optimizer=adamw",
    "gspo.num_minibatches=4",
]


def _even_length(completion, example):
    return rewards.RewardResult(float(len(completion) % 2 == 0))


def _run(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, CFG)
    s = prepare_splits(cfg)
    tr = [dataclasses.replace(e, task="test_dist_even_length") for e in s.train]
    # Registered here, in the process that trains: spawned ranks import this module afresh.
    with rewards.registered("test_dist_even_length", _even_length):
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

    def norm(d):
        return sum(float(v.double().pow(2).sum()) for v in d.values()) ** 0.5

    moved = norm({k: w1[k] - w0[k] for k in w1})
    # Adam divides by sqrt(v): float noise in near-zero gradients becomes steps of up to ~lr, so the weights
    # are compared relative to how far training moved them.
    assert norm({k: w1[k] - w2[k] for k in w1}) < 1e-2 * moved


@pytest.mark.slow
def test_torchrun_launches_the_cli(tmp_path):
    """The documented launch: torchrun over `gspo train`, rank 0 writing the checkpoint and the summary."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "gspo_cli",
        "train",
        "--output",
        str(tmp_path / "run"),
    ] + [a for c in CFG for a in ("--set", c)]
    proc = subprocess.run(
        cmd + ["--set", "train.steps=2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "run" / "train" / "final" / "model.safetensors").exists()
    assert len(_metrics(tmp_path / "run" / "train" / "metrics.jsonl")) == 2
    assert torch.isfinite(
        torch.tensor(
            [m["loss"] for m in _metrics(tmp_path / "run" / "train" / "metrics.jsonl") if "loss" in m] or [0.0]
        )
    ).all()


def _run_with(rank: int, world: int, port: int, model_dir: str, out: str, extra: list) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, CFG + extra)
    s = prepare_splits(cfg)
    tr = [dataclasses.replace(e, task="test_dist_even_length") for e in s.train]
    # Registered here, in the process that trains: spawned ranks import this module afresh.
    with rewards.registered("test_dist_even_length", _even_length):
        train(cfg, model_dir, tr, s.held_out, out)
    if world > 1:
        dist.destroy_process_group()


def _train(world: int, model_dir, out, extra: list) -> None:
    if world == 1:
        _run_with(0, 1, 0, str(model_dir), str(out), extra)
    else:
        mp.spawn(_run_with, args=(world, _free_port(), str(model_dir), str(out), extra), nprocs=world, join=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _norm(d: dict) -> float:
    return sum(float(v.double().pow(2).sum()) for v in d.values()) ** 0.5


def _apart(a: dict, b: dict, start: dict) -> float:
    """How far two trained weight sets are apart, relative to how far training moved the first."""
    assert a.keys() == b.keys()
    return _norm({k: a[k] - b[k] for k in a}) / _norm({k: a[k] - start[k] for k in a})


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_matches_one_process_and_resumes_across_the_switch(tmp_path):
    """train.sharding=fsdp (FSDP2 per decoder layer) on two ranks: the loss and the weights after 2 steps equal
    one process's (fp32 AdamW states); its checkpoints are one process's files, so a replicated run resumes from
    an fsdp one and the other way round, ending where the uninterrupted runs end.

    Gradients are summed in another order (per pass over ranks, then over passes), so they differ in float
    rounding; AdamW divides by the root of the second moment, which turns that noise in near-zero gradients
    into weight differences up to ~lr/30 for a few elements. Measured under ATEN_CPU_CAPABILITY avx512 and avx2:
    losses within 4e-8, weights apart by 0.9e-5 to 2.1e-5 of their change in norm (3 to 8 of 822k elements more
    than 1e-5 apart, the largest 1.1e-4); resumed across the switch, 2e-7 to 1.5e-5. The bound below leaves a
    5x margin."""
    model_dir = save_tiny(tmp_path / "tiny", seed=0)
    run = ["train.steps=2", "train.checkpoint_every=1", "train.eval_every=2"]
    _train(1, model_dir, tmp_path / "one", run)
    _train(2, model_dir, tmp_path / "two", run + ["train.sharding=fsdp"])
    one, two = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 2 and any(m["clip_frac"] > 0 for m in one)
    for a, b in zip(one, two):
        for key in ["reward_mean", "completion_len_mean", "eval_reward"]:
            assert a.get(key) == b.get(key), key
        for key in ["loss", "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "entropy"]:
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), key
    w0 = load_file(str(model_dir / "model.safetensors"))
    final = {name: load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("one", "two")}
    assert _apart(final["one"], final["two"], w0) < 1e-4
    assert _max_diff(final["one"], load_file(str(tmp_path / "one" / "best" / "model.safetensors"))) == 0

    # The step-1 checkpoints hold the same files, tensors of the same names and shapes.
    ckpts = {name: tmp_path / name / "checkpoints" / "step-00000001" for name in ("one", "two")}
    states = {name: torch.load(c / "trainer_state.pt", weights_only=False) for name, c in ckpts.items()}
    shapes = {
        name: {
            (i, k): tuple(v.shape)
            for i, st in s["optimizer"]["state"].items()
            for k, v in st.items()
            if torch.is_tensor(v)
        }
        for name, s in states.items()
    }
    assert shapes["one"] == shapes["two"] and len(shapes["one"]) > 0
    saved = {name: load_file(str(c / "model" / "model.safetensors")) for name, c in ckpts.items()}
    assert _apart(saved["one"], saved["two"], w0) < 1e-4
    assert sorted(p.name for p in ckpts["one"].rglob("*")) == sorted(p.name for p in ckpts["two"].rglob("*"))

    # Each directory again with the other sharding: it resumes from its step-1 checkpoint and redoes step 2.
    _train(2, model_dir, tmp_path / "one", run + ["train.sharding=fsdp"])
    _train(1, model_dir, tmp_path / "two", run)
    for name in ("one", "two"):
        again = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        assert _apart(final["one"], again, w0) < 1e-4, name
        assert [m["step"] for m in _metrics(tmp_path / name / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_fsdp_steps_bf16_shards_with_the_rounding_optimizer_and_resumes_a_replicated_run(tmp_path):
    """bf16 weights under fsdp: bitsandbytes (the rounding AdamW, 32-bit states) steps each rank's shard as a
    plain tensor. Same completions and gradient norms as one process; the weights differ by the stochastic
    rounding's draws (measured 5.8% of their change in norm; the bound leaves 3x). Its checkpoint holds whole
    bitsandbytes states, and a replicated run's checkpoint resumes under fsdp."""
    model_dir = save_tiny(tmp_path / "tiny", seed=0)
    run = ["train.steps=2", "train.checkpoint_every=1", "model.dtype=bfloat16"]
    _train(1, model_dir, tmp_path / "one", run)
    _train(2, model_dir, tmp_path / "two", run + ["train.sharding=fsdp"])
    one, two = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two):
        assert (a["reward_mean"], a["completion_len_mean"]) == (b["reward_mean"], b["completion_len_mean"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2)

    def as_float(d):
        return {k: v.float() for k, v in d.items()}

    w0 = as_float(load_file(str(model_dir / "model.safetensors")))
    final = {n: as_float(load_file(str(tmp_path / n / "final" / "model.safetensors"))) for n in ("one", "two")}
    assert _apart(final["one"], final["two"], w0) < 0.2
    states = [
        torch.load(tmp_path / n / "checkpoints" / "step-00000001" / "trainer_state.pt", weights_only=False)["optimizer"]
        for n in ("one", "two")
    ]
    quant = [
        {i: {k: tuple(v.shape) for k, v in st["__bnb_optimizer_quant_state__"].items()} for i, st in s["state"].items()}
        for s in states
    ]
    assert quant[0] == quant[1] and len(quant[0]) > 0
    _train(2, model_dir, tmp_path / "one", run + ["train.sharding=fsdp"])
    assert [m["step"] for m in _metrics(tmp_path / "one" / "metrics.jsonl")] == [1, 2]
    assert _apart(final["one"], as_float(load_file(str(tmp_path / "one" / "final" / "model.safetensors"))), w0) < 0.2


@pytest.mark.parametrize("field", ["optim.optimizer=adamw8bit", "model.lora_r=4", "gspo.decode=static"])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line_naming_the_fields(field):
    """bitsandbytes' 8-bit kernels take no DTensor ("got mixed torch.Tensor and DTensor"), and its per-block
    quantisation of a shard would not gather into one process's state; LoRA fits replicated; a CUDA graph
    cannot hold FSDP's gathers."""
    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match=rf"train.sharding=fsdp does not work with {field}") as e:
        load_config(None, ["train.sharding=fsdp", "optim.optimizer=adamw", field])
    assert len(str(e.value).splitlines()) == 1
