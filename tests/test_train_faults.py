"""Faults around `gspo train`: signals, torn and corrupt files, exploding weights, leftovers, two trainers, a
changed configuration. Nothing may be lost, nothing half-written may be trusted, and every error is one line."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import SMALL, _dense, _weights

import rewards
from gspo import checkpoint
from gspo.config import load_config
from gspo.data import prepare_splits
from gspo.errors import Diverged, Stopped
from gspo.tiny import save_tiny
from gspo.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# Half the untrained model's completions score 1; when armed, the call numbered ARMED["at"] sends this process a
# SIGTERM, so the signal lands while a rollout is being scored.
ARMED = {"at": None, "calls": 0}


def _even_length_or_signal(completion, example):
    ARMED["calls"] += 1
    if ARMED["calls"] == ARMED["at"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return rewards.RewardResult(float(len(completion) % 2 == 0))


# Module scope, set up before the module's other fixtures: `straight` trains with it.
@pytest.fixture(scope="module", autouse=True)
def fault_reward():
    with rewards.registered("test_fault_even_length", _even_length_or_signal):
        yield


pytestmark = pytest.mark.usefixtures("even_length_reward")


def _examples(s):
    return [dataclasses.replace(e, task="test_fault_even_length") for e in s.train]


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory):
    """An uninterrupted 6-step run: what every interrupted and resumed run must end equal to."""
    cfg = load_config(None, SMALL + ["train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=10"])
    s = prepare_splits(cfg)
    out = tmp_path_factory.mktemp("straight")
    return cfg, _examples(s), s.held_out, _weights(train(cfg, tiny_dir, _examples(s), s.held_out, out).final_dir)


class Interrupted(Exception):
    pass


def interrupt_at(step):
    def on_step(m):
        if m["step"] == step:
            raise Interrupted

    return on_step


def test_a_signal_during_the_rollout_abandons_the_step_and_resume_is_exact(tiny_dir, tmp_path, straight):
    cfg, tr, held, final = straight
    rows = cfg.gspo.prompts_per_step * cfg.gspo.group_size
    ARMED.update(at=2 * rows + 1, calls=0)  # the first completion of the third step
    try:
        with pytest.raises(Stopped) as e:
            train(cfg, tiny_dir, tr, held, tmp_path)
    finally:
        ARMED["at"] = None
    assert e.value.step == 2 and e.value.signum == signal.SIGTERM
    assert e.value.checkpoint_dir == tmp_path / "checkpoints" / "step-00000002"
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    res = train(cfg, tiny_dir, tr, held, tmp_path)
    w = _weights(res.final_dir)
    assert all(torch.equal(final[k], w[k]) for k in final)


def test_a_signal_during_the_updates_finishes_the_step_and_resume_is_exact(tiny_dir, tmp_path, straight):
    cfg, tr, held, final = straight

    def signal_in_update(model, update):
        if update == 2 * cfg.gspo.num_minibatches + 1:  # the third step's second update
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped) as e:
        train(cfg, tiny_dir, tr, held, tmp_path, after_backward=signal_in_update)
    assert e.value.step == 3 and e.value.checkpoint_dir == tmp_path / "checkpoints" / "step-00000003"
    res = train(cfg, tiny_dir, tr, held, tmp_path)
    w = _weights(res.final_dir)
    assert all(torch.equal(final[k], w[k]) for k in final)


def _ctrl_c_delivered():
    # Tests run in the background (nohup, `cmd &`) inherit SIGINT ignored, and a process keeps an ignored SIGINT
    # ignored; the command under test must get Ctrl-C as from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_command_outlives_its_test():
    yield
    while _started:  # a test that failed while its command ran must not leave it training
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "gspo_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=_ctrl_c_delivered,
        **kw,
    )
    _started.append(p)
    return p


def _config_file(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _wait_for(proc, text: str) -> list[str]:
    """stderr lines up to the first one containing text (the process goes on)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"process ended without printing {text!r}: {''.join(seen)[-2000:]}")


@pytest.mark.slow
def test_sigterm_checkpoints_says_where_and_exits_143_and_resume_matches(tiny_dir, tmp_path, straight):
    cfg, _, _, _ = straight
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=0, steps=400))
    path = _config_file(tmp_path, cfg)
    out = tmp_path / "run"
    p = _cli(["train", "--config", str(path), "--output", str(out)])
    metrics = out / "train" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gspo train: stopped by SIGTERM at step ") and "run the same command again" in last
    step = int(last.split("at step ")[1].split(";")[0])
    ckpt = out / "train" / "checkpoints" / f"step-{step:08d}"
    assert f"checkpoint {ckpt};" in last and (ckpt / checkpoint.MANIFEST).exists()
    assert len(metrics.read_text().splitlines()) == step  # nothing logged that the checkpoint does not hold
    checkpoint.verify(ckpt)


@pytest.mark.slow
def test_a_second_signal_ends_the_process_at_once(tiny_dir, tmp_path, straight):
    cfg = dataclasses.replace(straight[0], train=dataclasses.replace(straight[0].train, steps=10_000))
    p = _cli(["train", "--config", str(_config_file(tmp_path, cfg)), "--output", str(tmp_path / "run")])
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    while not metrics.exists():
        assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGINT)
    _wait_for(p, "SIGINT received")
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT


@pytest.mark.slow
def test_ctrl_c_outside_training_s_own_handling_is_one_line_and_exit_130(tiny_dir, tmp_path, straight):
    cfg = dataclasses.replace(straight[0], warm_start=dataclasses.replace(straight[0].warm_start, steps=1_000_000))
    p = _cli(["-v", "train", "--config", str(_config_file(tmp_path, cfg)), "--output", str(tmp_path / "run")])
    _wait_for(p, "warm start: up to 1000000 steps")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("gspo train: interrupted"), err
    assert not (tmp_path / "run" / "warm_start").exists()  # nothing half-written


def test_training_leaves_both_signals_to_a_process_whose_sigterm_another_handles():
    from gspo.trainer import stop_requests

    def orchestrator(signum, frame):  # what Prefect's flow engine installs while a flow runs
        pass

    old = signal.signal(signal.SIGTERM, orchestrator), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_requests():
            assert signal.getsignal(signal.SIGTERM) is orchestrator
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with stop_requests():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, orchestrator)
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def test_a_torn_metrics_line_is_dropped_on_resume(tiny_dir, tmp_path, straight):
    cfg, tr, held, final = straight
    with pytest.raises(Interrupted):
        train(cfg, tiny_dir, tr, held, tmp_path, on_step=interrupt_at(4))
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "reward_mean": 0.4, "ratio')  # the disk filled up during the append
    res = train(cfg, tiny_dir, tr, held, tmp_path)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]  # strict JSON: NaN would not parse
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    w = _weights(res.final_dir)
    assert all(torch.equal(final[k], w[k]) for k in final)


def test_a_bad_metrics_line_before_the_end_is_one_line_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics line") as e:
        checkpoint.truncate_metrics(path, 2)
    assert "\n" not in str(e.value)


def test_corrupt_checkpoints_are_set_aside_and_the_newest_intact_one_is_used(tiny_dir, tmp_path, straight, caplog):
    cfg, tr, held, final = straight
    with pytest.raises(Interrupted):
        train(cfg, tiny_dir, tr, held, tmp_path, on_step=interrupt_at(5))  # checkpoints of steps 1-4
    ck = tmp_path / "checkpoints"
    (ck / "step-00000004" / "trainer_state.pt").write_bytes(b"")  # emptied
    weights = ck / "step-00000003" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    (ck / "step-00000002" / checkpoint.MANIFEST).unlink()  # written last: its absence means unfinished
    with caplog.at_level(logging.WARNING, logger="gspo.checkpoint"):
        seen = []
        res = train(cfg, tiny_dir, tr, held, tmp_path, on_step=seen.append)
    assert [m["step"] for m in seen] == [2, 3, 4, 5, 6]  # resumed from step 1
    aside = sorted(p.name.split(".")[0] for p in ck.iterdir() if ".corrupt-" in p.name)
    assert aside == ["step-00000002", "step-00000003", "step-00000004"]  # kept, never deleted
    warnings = [r.getMessage() for r in caplog.records]
    assert any("trainer_state.pt does not match its checksum" in m for m in warnings)
    assert any("model/model.safetensors does not match its checksum" in m for m in warnings)
    assert any(f"no readable {checkpoint.MANIFEST}" in m for m in warnings)
    w = _weights(res.final_dir)
    assert all(torch.equal(final[k], w[k]) for k in final)


@pytest.mark.parametrize("lr", ["1e8", "30"])
def test_exploding_weights_stop_training_and_nothing_is_saved(tiny_dir, tmp_path, lr):
    cfg = load_config(None, SMALL + [f"optim.lr={lr}", "train.checkpoint_every=1", "optim.optimizer=adamw"])
    s = prepare_splits(cfg)
    with pytest.raises(Diverged, match=r"took the weights' norm from .* lower optim.lr; the last good checkpoint is"):
        train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path)
    assert not (tmp_path / "final").exists()
    for ckpt in checkpoint.all_steps(tmp_path):
        checkpoint.verify(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        w = _weights(ckpt / "model")
        assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in w.values()), state["state"]["step"]


@pytest.mark.slow
def test_exploding_weights_via_the_cli_are_one_line_and_exit_1(tmp_path):
    """The demo's case: after a short warm start some sums come out right, so groups have mixed rewards and the
    first update at lr 1e8 explodes the weights. Nothing may be saved and the error is one line."""
    cfg = load_config(
        None,
        SMALL
        + [
            "optim.lr=1e8",
            "warm_start.steps=150",
            "warm_start.lr=2e-3",
            "gspo.prompts_per_step=16",
            "gspo.group_size=8",
        ],
    )
    p = _cli(["train", "--config", str(_config_file(tmp_path, cfg)), "--output", str(tmp_path / "run")])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1 and out == "", err
    assert err.strip().splitlines()[-1].startswith("gspo train: error: update 0 took the weights' norm from")
    assert "the last good checkpoint is none: nothing was saved" in err
    assert not (tmp_path / "run" / "train" / "final").exists()
    assert not checkpoint.all_steps(tmp_path / "run" / "train")


def test_leftovers_of_killed_writes_are_removed_on_the_next_start(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=1"])
    s = prepare_splits(cfg)
    leftovers = [
        tmp_path / ".final-k2j3",
        tmp_path / ".best-x9",
        tmp_path / ".best.old-77",
        tmp_path / "checkpoints" / ".step-00000002-ab12",
    ]
    for d in leftovers:
        (d / "model").mkdir(parents=True)
        (d / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path)
    assert not any(d.exists() for d in leftovers)


def test_a_second_trainer_on_the_same_directory_is_refused_naming_the_holder(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=1"])
    s = prepare_splits(cfg)
    with (
        checkpoint.RunLock(tmp_path),
        pytest.raises(ValueError, match=rf"is in use by another training process \(pid {os.getpid()}\)"),
    ):
        train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path)  # free again once the holder is done


@pytest.mark.slow  # trainings through the command, in subprocesses
def test_a_run_of_another_configuration_is_never_resumed_or_overwritten(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=2"])
    s = prepare_splits(cfg)
    train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    other = load_config(None, SMALL + ["train.steps=2", "optim.lr=2e-3", "gspo.group_size=2"])
    with pytest.raises(ValueError) as e:
        train(other, tiny_dir, _dense(s.train), s.held_out, tmp_path)
    msg = str(e.value)
    assert "holds a run of another training configuration" in msg and "\n" not in msg
    assert "optim.lr: 0.001 -> 0.002" in msg and "gspo.group_size: 4 -> 2" in msg
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    # what cannot change the result may change: threads, progress, checkpoint cadence
    train(
        load_config(None, SMALL + ["train.steps=2", "train.threads=2", "train.checkpoint_every=1"]),
        tiny_dir,
        _dense(s.train),
        s.held_out,
        tmp_path,
    )
