import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gspo.config import load_config
from gspo.data import prepare_splits
from gspo.models import load_model, load_tokenizer
from gspo.tiny import save_tiny
from gspo.trainer import PromptSampler, TrainState, train

# A few-second configuration: the base tiny model, short completions, one thread for bitwise determinism.
SMALL = [
    "train.steps=4",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "train.eval_every=0",
    "train.checkpoint_every=2",
    "train.progress=false",
    "train.threads=1",
    "data.eval_size=20",
    "optim.lr=1e-3",
    "optim.optimizer=adamw8bit",
]


pytestmark = pytest.mark.usefixtures("even_length_reward")


def _dense(examples):
    """The examples scored by the `test_even_length` reward (conftest's even_length_reward fixture)."""
    return [dataclasses.replace(e, task="test_even_length") for e in examples]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _weights(d: Path) -> dict:
    return load_file(str(Path(d) / "model.safetensors"))


def test_metrics_cover_every_documented_signal(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=2", "gspo.beta=0.1"])
    s = prepare_splits(cfg)
    seen = []
    mixed = [dataclasses.replace(e, task="test_even_length") if i % 2 else e for i, e in enumerate(s.train)]
    res = train(cfg, tiny_dir, mixed, s.held_out, tmp_path, on_step=seen.append)
    assert res.steps == 2 and len(seen) == 2
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert rows == json.loads(json.dumps(seen))
    for key in [
        "reward_mean",
        "reward_std",
        "reward/arithmetic",
        "reward/test_even_length",
        "advantage_mean",
        "advantage_std",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "kl",
        "entropy",
        "completion_len_mean",
        "completion_len_max",
        "truncated_frac",
        "zero_std_group_frac",
        "grad_norm",
        "lr",
        "skipped_updates",
        "tokens_per_s",
        "time_rollout_s",
        "time_reward_s",
        "time_update_s",
    ]:
        assert all(key in r for r in rows) or (key.startswith("reward/") and any(key in r for r in rows)), key
    # The first minibatch of every step is on-policy, later ones are not: the ratio must leave 1.
    assert rows[-1]["ratio_max"] > 1.0 or rows[-1]["ratio_min"] < 1.0
    assert (res.final_dir / "config.json").exists()


def test_several_minibatches_make_the_clip_act(tiny_dir, tmp_path):
    """With one update per rollout batch the ratio is exactly 1; with four, later updates see clipped sequences."""
    one = load_config(None, SMALL + ["train.steps=1", "gspo.num_minibatches=1"])
    four = load_config(None, SMALL + ["train.steps=2", "gspo.num_minibatches=4", "optim.lr=1e-2"])
    s = prepare_splits(one)
    tr = _dense(s.train)
    r1 = [
        json.loads(x)
        for x in train(one, tiny_dir, tr, s.held_out, tmp_path / "a").metrics_path.read_text().splitlines()
    ]
    assert r1[0]["ratio_min"] == pytest.approx(1.0, abs=1e-6) and r1[0]["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert r1[0]["clip_frac"] == 0.0
    r4 = [
        json.loads(x)
        for x in train(four, tiny_dir, tr, s.held_out, tmp_path / "b").metrics_path.read_text().splitlines()
    ]
    assert max(r["clip_frac"] for r in r4) > 0.0


def test_groups_with_equal_rewards_are_not_trained_on(tiny_dir, tmp_path):
    """All groups score the same (the untrained model gets no sum right): no row has an advantage, so no
    forward or backward runs, no loss metric exists, and with fresh AdamW moments the weights stay put."""
    cfg = load_config(None, SMALL + ["train.steps=1", "train.eval_every=0"])
    s = prepare_splits(cfg)
    res = train(cfg, tiny_dir, s.train, s.held_out, tmp_path)
    row = json.loads(res.metrics_path.read_text().splitlines()[0])
    assert row["zero_std_group_frac"] == 1.0 and row["grad_norm"] == 0.0 and row["trained_frac"] == 0.0
    assert row["loss"] == 0.0 and row["clip_frac"] == 0.0 and "ratio_mean" not in row
    before, after = _weights(tiny_dir), _weights(res.final_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_static_decoder_trains_like_the_eager_one(tiny_dir, tmp_path):
    """gspo.decode=static (compiled, static KV cache) samples the same completions in fp32, so training follows.

    The runs differ only in the decoders' log-probs (within 1e-5 per token, tests/test_static_decode.py), which
    on the fp32 CPU path are the old log-probs. Measured over train seeds 0-4 under ATEN_CPU_CAPABILITY default,
    avx2 and avx512: loss differences up to 2.7e-7, weight changes that differ by up to 1.8e-5 of their norm
    with fp32 AdamW states (up to 4e-4 with 8-bit states, whose quantisation buckets flip on tiny
    differences, so fp32 states are used here). The bounds below leave a 4-5x margin."""
    from torch._dynamo.utils import counters

    runs, compiled = {}, {}
    for decode in ("eager", "static"):
        cfg = load_config(
            None,
            SMALL + ["train.steps=2", "train.checkpoint_every=0", f"gspo.decode={decode}", "optim.optimizer=adamw"],
        )
        s = prepare_splits(cfg)
        before = counters["stats"]["unique_graphs"]
        res = train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path / decode)
        compiled[decode] = counters["stats"]["unique_graphs"] - before
        runs[decode] = ([json.loads(x) for x in res.metrics_path.read_text().splitlines()], _weights(res.final_dir))
    assert compiled["eager"] == 0 and compiled["static"] > 0  # the switch reached the decoder
    (m_e, w_e), (m_s, w_s), w0 = runs["eager"], runs["static"], _weights(tiny_dir)
    for a, b in zip(m_e, m_s):
        assert (a["reward_mean"], a["completion_len_mean"]) == (b["reward_mean"], b["completion_len_mean"])
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    diff = sum(float((w_e[k] - w_s[k]).norm()) ** 2 for k in w_e) ** 0.5
    change = sum(float((w_e[k] - w0[k]).norm()) ** 2 for k in w_e) ** 0.5
    assert diff / change < 1e-4, diff / change


def test_nan_gradient_skips_the_update_and_training_goes_on(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.checkpoint_every=0"])
    s = prepare_splits(cfg)

    def poison(model, update):
        if update == 1:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    res = train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path, after_backward=poison)
    assert res.steps == 4 and res.skipped_updates == 1 and not res.stopped_early
    assert all(torch.isfinite(w).all() for w in _weights(res.final_dir).values())


def test_consecutive_non_finite_updates_stop_with_a_checkpoint(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=10", "train.max_consecutive_skips=3", "train.checkpoint_every=0"])
    s = prepare_splits(cfg)
    before = _weights(tiny_dir)

    def poison(model, update):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("inf"))

    res = train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path, after_backward=poison)
    assert res.stopped_early and res.skipped_updates == 3 and res.steps == 1
    assert (tmp_path / "checkpoints").exists()
    after = _weights(res.final_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no poisoned update was applied


def test_sampler_resumes_mid_epoch():
    st = TrainState()
    full = PromptSampler(10, 3, st).take(25)
    st2 = TrainState()
    a = PromptSampler(10, 3, st2).take(7)
    resumed = TrainState(epoch=st2.epoch, position=st2.position)
    assert a + PromptSampler(10, 3, resumed).take(18) == full
    assert sorted(full[:10]) == list(range(10))


def _gspo_train(cfg_path: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "gspo_cli", "train", "--config", str(cfg_path), "--output", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    import yaml

    cfg = load_config(None, SMALL + ["train.steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=10"])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))

    straight = _gspo_train(cfg_path, tmp_path / "straight")
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out.decode()[-2000:]

    killed = _gspo_train(cfg_path, tmp_path / "killed")
    ckpt = tmp_path / "killed" / "train" / "checkpoints" / "step-00000004" / "trainer_state.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "train" / "final").exists()

    resumed = _gspo_train(cfg_path, tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()[-2000:]
    a, b = _weights(tmp_path / "straight" / "train" / "final"), _weights(tmp_path / "killed" / "train" / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    m1 = (tmp_path / "straight" / "train" / "metrics.jsonl").read_text().splitlines()
    m2 = (tmp_path / "killed" / "train" / "metrics.jsonl").read_text().splitlines()

    def strip(rows):
        return [
            {k: v for k, v in json.loads(r).items() if not k.startswith(("time_", "tokens_per_s", "rollout_tokens"))}
            for r in rows
        ]

    assert strip(m1) == strip(m2)


def test_lora_with_gradient_checkpointing_trains_resumes_and_saves_merged_weights(tiny_dir, tmp_path):
    base = [
        "model.lora_r=4",
        "model.lora_target_modules=q_proj,v_proj",
        "model.gradient_checkpointing=true",
        "train.checkpoint_every=1",
    ]
    s = prepare_splits(load_config(None, SMALL))
    tr = _dense(s.train)
    cfg = load_config(None, SMALL + base + ["train.steps=3"])
    straight = train(cfg, tiny_dir, tr, s.held_out, tmp_path / "a")

    class Interrupted(Exception):
        pass

    def interrupt_at_step_2(m):
        if m["step"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, tiny_dir, tr, s.held_out, tmp_path / "b", on_step=interrupt_at_step_2)
    assert not (tmp_path / "b" / "final").exists()
    seen = []
    resumed = train(cfg, tiny_dir, tr, s.held_out, tmp_path / "b", on_step=seen.append)
    assert [m["step"] for m in seen] == [2, 3]  # resumed from the step-1 checkpoint, not started over
    a, b, w0 = _weights(straight.final_dir), _weights(resumed.final_dir), _weights(tiny_dir)
    assert a.keys() == w0.keys()  # merged: a plain transformers checkpoint, no adapter keys
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [k for k in a if not torch.equal(a[k], w0[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def _tiny_with_dropout(src: Path, dst: Path) -> Path:
    """The tiny model with attention dropout 0.1 in its config, as some hub models ship."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.1}))
    return dst


@pytest.mark.parametrize("level", ["sequence", "sequence_token", "token"])
@pytest.mark.parametrize("variant", ["fp32", "bf16", "bf16-lora-checkpointing", "fp32-dropout-in-config"])
def test_first_update_of_a_step_is_exactly_on_policy(tiny_dir, tmp_path, level, variant):
    """The first update of every step sees the policy that sampled: ratio 1, nothing clipped. One minibatch
    per step makes every update a first one. The fp32 CPU path uses the sampler's own log-probs, which equal
    a fresh forward's to about 1e-6 (tests/test_rollout.py); every other path recomputes them in the update's
    own micro-batches, exactly."""
    model_dir = _tiny_with_dropout(tiny_dir, tmp_path / "m") if "dropout" in variant else tiny_dir
    extra = {
        "fp32": [],
        "fp32-dropout-in-config": [],
        "bf16": ["model.dtype=bfloat16"],
        "bf16-lora-checkpointing": ["model.dtype=bfloat16", "model.lora_r=4", "model.gradient_checkpointing=true"],
    }
    cfg = load_config(
        None,
        SMALL
        + extra[variant]
        + [
            f"gspo.importance_sampling_level={level}",
            "train.steps=3",
            "gspo.num_minibatches=1",
            "train.checkpoint_every=0",
            "optim.micro_batch_tokens=40",
        ],
    )
    s = prepare_splits(cfg)
    res = train(cfg, model_dir, _dense(s.train), s.held_out, tmp_path / "out")
    rows = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    tol = 1e-5 if variant.startswith("fp32") else 0.0
    for r in rows:
        assert r["trained_frac"] > 0 and r["clip_frac"] == 0.0, r
        assert abs(r["ratio_min"] - 1) <= tol and abs(r["ratio_max"] - 1) <= tol, r


@pytest.mark.parametrize("prompts, group, minibatches", [(3, 4, 5), (5, 2, 4), (4, 4, 3)])
def test_a_step_makes_exactly_num_minibatches_near_equal_updates(tiny_dir, tmp_path, prompts, group, minibatches):
    from gspo import update

    cfg = load_config(
        None,
        SMALL
        + [
            f"gspo.prompts_per_step={prompts}",
            f"gspo.group_size={group}",
            f"gspo.num_minibatches={minibatches}",
            "train.steps=2",
            "train.checkpoint_every=0",
            "gspo.beta=0.1",
        ],
    )
    rows = prompts * group
    sizes = []
    for step in range(3):
        plan = update.make_plan(_FakeRoll(rows), torch.ones(rows), cfg, step, 0, rows)
        sizes = [mb.size for mb in plan]
        assert len(plan) == minibatches and max(sizes) - min(sizes) <= 1 and sum(sizes) == rows
        assert sorted(torch.cat([m for mb in plan for m in mb.micro]).tolist()) == list(range(rows))
    s = prepare_splits(cfg)
    seen = []
    train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path, on_step=seen.append)
    # The schedule is built for steps x num_minibatches updates: the last update takes its last value.
    assert seen[-1]["lr"] == pytest.approx(
        cfg.optim.lr
        * (
            cfg.optim.min_lr_ratio
            + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * (2 * minibatches - 1) / (2 * minibatches)))
        )
    )


class _FakeRoll:
    """The two fields make_plan reads of a rollout: row count and completion mask."""

    def __init__(self, rows):
        self.completion_mask = torch.ones(rows, 2, dtype=torch.long)
        self.prompt_ids = torch.ones(rows, 3, dtype=torch.long)

    def __len__(self):
        return self.completion_mask.shape[0]


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor reads by the host (item, bool, int, float, tolist, ...) made by gspo's own code: each one
    waits for the GPU to finish what was queued before it."""

    READS = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.__bool__,
            torch.Tensor.__int__,
            torch.Tensor.__float__,
            torch.Tensor.__index__,
            torch.Tensor.cpu,
            torch.Tensor.numpy,
        }
    )

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        if func in self.READS and Path(sys._getframe(1).f_code.co_filename).parent.name == "gspo":
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_updates_read_the_device_once_per_update_whatever_the_number_of_passes(tiny_dir):
    """Old log-probs and the updates of a rollout, in one pass per update or one row per pass: gspo's own code
    reads the device as often either way (rows are sorted by length into passes from a host copy of the masks)."""
    from gspo import update
    from gspo.advantages import group_advantages
    from gspo.optim import make_optimizer, make_scheduler
    from gspo.trainer import rollout

    reads, passes = {}, {}
    for budget in (100_000, 1):
        cfg = load_config(
            None,
            SMALL
            + [
                "gspo.num_minibatches=2",
                f"optim.micro_batch_tokens={budget}",
                "optim.optimizer=adamw",
                "gspo.max_new_tokens=8",
            ],
        )
        torch.manual_seed(0)
        model = load_model(tiny_dir, cfg.model, torch.device("cpu"))
        tok = load_tokenizer(tiny_dir)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.optim)
        sched = make_scheduler(opt, cfg.optim, 2)
        roll = rollout(model, tok, ["1+2=", "3+4=", "10-2=", "7+7="], cfg, 0, 0, 16)
        adv, _ = group_advantages(torch.arange(16.0), 4)
        plan = update.make_plan(roll, adv, cfg, 0, 0, 16)
        with _HostReads() as counted:
            old = update.logprobs(model, roll, plan, 1.0)
            res = update.run_updates(model, opt, sched, params, roll, adv, old, None, plan, cfg)
        assert all(res.finite) and len(res.finite) == 2
        reads[budget], passes[budget] = counted.n, sum(len(mb.micro) for mb in plan)
    assert passes[1] == 16 > passes[100_000] == 2
    assert reads[1] == reads[100_000], reads


def test_passes_take_rows_longest_first_and_fill_the_token_budget():
    from gspo import update

    lens = torch.tensor([1, 9, 2, 8, 3, 7, 1, 9])  # completion lengths of rows 0..7
    micro = update.micro_batches(torch.arange(8), lens, 2, 22)  # prompts 2 wide, 22 tokens per pass
    # Widths 2 + 9, 2 + 8 and 2 + 3: 2, 2 and 4 rows; 62 padded tokens where taking rows as they come, two at a
    # time (the widest pass's row count), pads to 82.
    assert [m.tolist() for m in micro] == [[1, 7], [3, 5], [4, 2, 0, 6]]
    assert update.micro_batches(torch.tensor([5]), lens, 2, 3)[0].tolist() == [5]  # a row alone may exceed it
