"""Each logged metric means one thing whatever the micro-batch, minibatch or rank split that computed it."""

import json
import math

import pytest
import torch
from test_trainer import SMALL, _dense

from gspo import metrics
from gspo.config import LEVELS, load_config
from gspo.data import format_prompt, prepare_splits
from gspo.loss import policy_loss
from gspo.models import load_tokenizer
from gspo.tiny import save_tiny
from gspo.trainer import PromptSampler, TrainState, train

pytestmark = pytest.mark.usefixtures("even_length_reward")

F64 = torch.float64


def batch(seed=0, B=12, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=F64)
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)  # far enough off-policy that the clip acts
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[torch.randperm(B, generator=g)[:4]] = 0.0  # rows of equal-reward groups
    return logp, old, adv, mask


def split_stats(logp, old, adv, mask, level, eps, seed):
    """Stats as the trainer adds them: rows of zero advantage skipped, the rest in random minibatches of random
    micro-batches (minibatches and ranks add up the same way micro-batches do)."""
    g = torch.Generator().manual_seed(seed)
    total = None
    rows = torch.randperm(len(adv), generator=g)
    skipped, trained = rows[adv[rows] == 0], rows[adv[rows] != 0]
    total = metrics.add(total, metrics.skipped_rows(len(skipped), int(mask[skipped].sum()), level == "token", logp))
    cuts = sorted(torch.randperm(len(trained) - 1, generator=g)[:3].add(1).tolist())
    for part in torch.tensor_split(trained, cuts):
        out = policy_loss(logp[part], old[part], adv[part], mask[part], level, *eps)
        total = metrics.add(total, out.stats)
    return metrics.finish(total)


@pytest.mark.parametrize("level", LEVELS)
def test_loss_and_clip_metrics_do_not_depend_on_the_split(level):
    logp, old, adv, mask = batch()
    eps = (0.2, 0.2) if level == "token" else (0.05, 0.05)
    whole = policy_loss(logp, old, adv, mask, level, *eps).metrics
    trained = adv != 0
    on_trained = policy_loss(logp[trained], old[trained], adv[trained], mask[trained], level, *eps).metrics
    assert 0 < whole["clip_frac"] < 1
    for seed in range(5):
        got = split_stats(logp, old, adv, mask, level, eps, seed)
        # loss and clip fractions over every row (or token), skipped rows included: they add 0 and are never clipped
        for k in ("loss", "clip_frac", "clip_frac_low", "clip_frac_high"):
            assert got[k] == pytest.approx(whole[k], abs=1e-12), k
        # ratios are only known for rows that were computed
        for k in ("ratio_mean", "ratio_min", "ratio_max"):
            assert got[k] == pytest.approx(on_trained[k], abs=1e-12), k


def test_token_level_fractions_count_tokens():
    logp, old, adv, mask = batch(1)
    out = policy_loss(logp, old, adv, mask, "token", 0.2, 0.2)
    m = mask.bool()
    ratio = (logp - old).exp()
    a = adv[:, None].expand_as(ratio)
    clipped = ((ratio > 1.2) & (a > 0) | (ratio < 0.8) & (a < 0)) & m
    assert out.metrics["clip_frac"] == pytest.approx(int(clipped.sum()) / int(m.sum()), abs=1e-12)
    assert out.metrics["ratio_mean"] == pytest.approx(float(ratio[m].mean()), abs=1e-12)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_step_metrics_are_the_same_for_any_micro_batch_size(tiny_dir, tmp_path):
    rows = {}
    for budget in (10_000, 12):  # one micro-batch per update, or one or two rows per micro-batch
        cfg = load_config(
            None,
            SMALL
            + [
                "train.steps=1",
                "gspo.num_minibatches=2",
                f"optim.micro_batch_tokens={budget}",
                "gspo.importance_sampling_level=token",
                "optim.lr=3e-2",
                "optim.optimizer=adamw",
            ],
        )
        s = prepare_splits(cfg)
        res = train(cfg, tiny_dir, _dense(s.train), s.held_out, tmp_path / str(budget))
        rows[budget] = json.loads(res.metrics_path.read_text().splitlines()[0])
    a, b = rows.values()
    assert 0 < a["clip_frac"] < 1, (a, b)
    for k in ("loss", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "trained_frac", "reward_mean", "entropy"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_lr_is_the_rate_of_the_steps_last_update_and_tokens_per_s_counts_the_batch_once(tiny_dir, tmp_path):
    cfg = load_config(None, SMALL + ["train.steps=2", "gspo.num_minibatches=4", "optim.warmup_steps=16"])
    s = prepare_splits(cfg)
    tr = _dense(s.train)
    seen = []
    train(cfg, tiny_dir, tr, s.held_out, tmp_path, on_step=seen.append)
    # warmup over 16 updates: the first step's updates use 1/16 .. 4/16 of the peak, the second's 5/16 .. 8/16
    assert [m["lr"] for m in seen] == pytest.approx([cfg.optim.lr * 4 / 16, cfg.optim.lr * 8 / 16])
    tok = load_tokenizer(tiny_dir)
    ids = PromptSampler(len(tr), cfg.train.seed, TrainState()).take(cfg.gspo.prompts_per_step)
    prompt_tokens = sum(len(tok(format_prompt(tok, tr[i]), add_special_tokens=False).input_ids) for i in ids)
    m = seen[0]
    n_rows = cfg.gspo.prompts_per_step * cfg.gspo.group_size
    batch_tokens = prompt_tokens * cfg.gspo.group_size + m["completion_len_mean"] * n_rows
    seconds = m["time_rollout_s"] + m["time_reward_s"] + m["time_update_s"]
    assert m["tokens_per_s"] * seconds == pytest.approx(batch_tokens, rel=1e-6)
    assert math.isfinite(m["grad_norm"])
