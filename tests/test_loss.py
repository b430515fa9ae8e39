import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gspo.loss import LEVELS, policy_loss

F64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=F64)


# Two sequences, lengths 3 and 2; the last slot of row 2 is padding (its values must not matter).
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.3, 7.0]]
OLD = [[-1.1, -1.9, -0.8], [-0.3, -1.0, -9.0]]  # log ratios [0.1, -0.1, 0.3] and [0.0, -0.3]
REF = [[-1.0, -2.2, -0.4], [-0.5, -1.3, 5.0]]  # log(ref / pi): [0.0, -0.2, 0.1] and [-0.2, 0.0]
MASK = [[1, 1, 1], [1, 1, 0]]
e = math.exp


def k3(d):
    return e(d) - d - 1


def hand(level, adv, eps, **kw):
    return policy_loss(t(LOGP), t(OLD), t(adv), torch.tensor(MASK), level, eps, eps, **kw)


def test_hand_values_sequence():
    # s1 = e^(0.3 / 3) = 1.105 > 1.05 with A = +1: clipped to 1.05.  s2 = e^(-0.3 / 2) = 0.861, A = +0.5: unclipped.
    out = hand("sequence", [1.0, 0.5], 0.05)
    assert out.loss.item() == pytest.approx(-(1.05 * 1.0 + e(-0.15) * 0.5) / 2, abs=1e-12)
    m = out.metrics
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (0.5, 0.5, 0.0)
    assert m["ratio_mean"] == pytest.approx((e(0.1) + e(-0.15)) / 2, abs=1e-12)
    assert (m["ratio_min"], m["ratio_max"]) == (pytest.approx(e(-0.15)), pytest.approx(e(0.1)))
    assert "kl" not in m

    out = hand("sequence", [1.0, 0.5], 0.05, ref_logp=t(REF), beta=0.1)
    kl = ((k3(0.0) + k3(-0.2) + k3(0.1)) / 3 + (k3(-0.2) + k3(0.0)) / 2) / 2
    assert out.metrics["kl"] == pytest.approx(kl, abs=1e-12)
    assert out.metrics["loss"] == pytest.approx(-(1.05 + e(-0.15) * 0.5) / 2, abs=1e-12)
    assert out.loss.item() == pytest.approx(-(1.05 + e(-0.15) * 0.5) / 2 + 0.1 * kl, abs=1e-12)


def test_hand_values_sequence_token_with_per_token_advantages():
    # every token carries its sequence's ratio: 1.105 in row 1, 0.861 in row 2; clip range [0.95, 1.05]
    adv = [[1.0, -1.0, 0.5], [0.5, -2.0, 99.0]]
    out = hand("sequence_token", adv, 0.05)
    row1 = (1.05 * 1.0 + e(0.1) * -1.0 + 1.05 * 0.5) / 3  # tokens 1 and 3 clipped high, token 2 not (A < 0)
    row2 = (e(-0.15) * 0.5 + 0.95 * -2.0) / 2  # token 1 unclipped (A > 0), token 2 clipped low
    assert out.loss.item() == pytest.approx(-(row1 + row2) / 2, abs=1e-12)
    m = out.metrics
    assert m["clip_frac"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["clip_frac_high"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["clip_frac_low"] == pytest.approx((0 + 1 / 2) / 2)
    assert m["ratio_mean"] == pytest.approx((e(0.1) + e(-0.15)) / 2, abs=1e-12)
    # d loss / d logp_t = -(1 / B) (1 / |y_i|) s_i A_i,t on unclipped tokens, 0 on clipped ones and padding
    logp = t(LOGP).requires_grad_()
    policy_loss(logp, t(OLD), t(adv), torch.tensor(MASK), "sequence_token", 0.05, 0.05).loss.backward()
    expected = [[0.0, -(1 / 2) * (1 / 3) * e(0.1) * -1.0, 0.0], [-(1 / 2) * (1 / 2) * e(-0.15) * 0.5, 0.0, 0.0]]
    assert torch.allclose(logp.grad, t(expected), rtol=0, atol=1e-12)


def test_hand_values_token():
    # ratios [1.105, 0.905, 1.350] with A = +1 (third clipped to 1.2);
    # [1.0, 0.741] with A = -0.5 (second clipped to 0.8)
    out = hand("token", [1.0, -0.5], 0.2)
    row1 = (e(0.1) + e(-0.1) + 1.2) / 3
    row2 = (1.0 * -0.5 + 0.8 * -0.5) / 2
    assert out.loss.item() == pytest.approx(-(row1 + row2) / 2, abs=1e-12)
    m = out.metrics
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (0.4, 0.2, 0.2)
    assert m["ratio_mean"] == pytest.approx((e(0.1) + e(-0.1) + e(0.3) + 1.0 + e(-0.3)) / 5, abs=1e-12)
    assert (m["ratio_min"], m["ratio_max"]) == (pytest.approx(e(-0.3)), pytest.approx(e(0.3)))


def batch(seed, B=6, T=7, scale=0.3, per_token_adv=False):
    """Random float64 batch with ragged lengths, one of them zero."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 0, 1, T - 2, 3, T][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp + scale * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64) if per_token_adv else torch.randn(B, generator=g, dtype=F64)
    return logp.requires_grad_(), old, adv, mask, ref


def loss_and_grad(logp, *args, **kw):
    logp = logp.detach().requires_grad_()
    out = policy_loss(logp, *args, **kw)
    out.loss.backward()
    return out, logp.grad


@pytest.mark.parametrize("level", LEVELS)
def test_padding_values_never_matter(level):
    logp, old, adv, mask, ref = batch(0, per_token_adv=level != "sequence")
    kw = dict(level=level, eps_low=0.2, eps_high=0.2, ref_logp=ref, beta=0.1)
    out, grad = loss_and_grad(logp, old, adv, mask, **kw)
    pad = mask == 0
    junk = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30], dtype=F64)
    fill = junk[torch.arange(int(pad.sum())) % 5]

    def poison(x):
        return x.detach().masked_scatter(pad, fill) if x.shape == pad.shape else x

    out2, grad2 = loss_and_grad(poison(logp), poison(old), poison(adv), mask, **{**kw, "ref_logp": poison(ref)})
    assert torch.equal(out.loss, out2.loss)
    assert out.metrics == out2.metrics
    assert torch.equal(grad, grad2)
    assert torch.equal(grad[pad], torch.zeros(int(pad.sum()), dtype=F64))


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(level):
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.randn(4, generator=g, dtype=F64)
    out = policy_loss(logp.clone().requires_grad_(), logp, adv, mask, level)
    assert out.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert out.metrics["ratio_min"] == out.metrics["ratio_max"] == 1.0
    assert out.metrics["clip_frac"] == 0.0


def test_gspo_token_equals_gspo_for_per_sequence_advantages():
    logp, old, adv, mask, ref = batch(2, scale=1e-3)
    kw = dict(eps_low=3e-4, eps_high=4e-4, ref_logp=ref, beta=0.05)
    seq, g_seq = loss_and_grad(logp, old, adv, mask, level="sequence", **kw)
    tok, g_tok = loss_and_grad(logp, old, adv, mask, level="sequence_token", **kw)
    assert 0 < seq.metrics["clip_frac"] < 1  # both the clipped and the unclipped branch are exercised
    assert torch.allclose(seq.loss, tok.loss, rtol=0, atol=1e-14)
    assert torch.allclose(g_seq, g_tok, rtol=0, atol=1e-14)
    assert g_seq.abs().sum() > 0
    assert seq.metrics == pytest.approx(tok.metrics, abs=1e-14)


def test_gspo_clip_fraction_counts_sequences_not_tokens():
    # lengths differ so that a token-weighted fraction would give another number
    rows = [  # (length, ratio, advantage, clipped?)
        (1, 1.5, 1.0, "high"),  # above the range, A > 0: clipped term wins
        (5, 1.5, -1.0, None),  # above the range, A < 0: unclipped term wins
        (2, 0.5, -1.0, "low"),
        (4, 0.5, 1.0, None),
        (3, 1.1, 1.0, None),  # inside the range
        (5, 1.5, 0.0, None),  # no advantage, nothing to cut
    ]
    T = 5
    mask = torch.tensor([[1] * n + [0] * (T - n) for n, *_ in rows])
    old = -torch.ones(len(rows), T, dtype=F64)
    logp = old + torch.tensor([[math.log(r)] * T for _, r, _, _ in rows], dtype=F64)
    adv = torch.tensor([a for _, _, a, _ in rows], dtype=F64)
    out, grad = loss_and_grad(logp, old, adv, mask, level="sequence", eps_low=0.2, eps_high=0.2)
    m = out.metrics
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (2 / 6, 1 / 6, 1 / 6)
    for i, (_, _, a, clipped) in enumerate(rows):
        assert (grad[i].abs().sum() == 0) == (clipped is not None or a == 0), i  # "clipped" means the gradient was cut


def test_empty_sequences_add_zero_but_count():
    logp, old, adv, mask, ref = batch(3)
    keep = mask.any(-1)
    kw = dict(eps_low=0.2, eps_high=0.2, ref_logp=ref, beta=0.1)
    for level in LEVELS:
        full, grad = loss_and_grad(logp, old, adv, mask, level=level, **kw)
        part, _ = loss_and_grad(
            logp[keep], old[keep], adv[keep], mask[keep], level=level, **{**kw, "ref_logp": ref[keep]}
        )
        assert torch.isfinite(grad).all()
        assert full.loss.item() == pytest.approx(part.loss.item() * int(keep.sum()) / len(keep), abs=1e-12)
        empty = policy_loss(logp, old, adv, torch.zeros_like(mask), level, ref_logp=ref, beta=0.1)
        assert empty.loss.item() == 0.0
        assert all(math.isfinite(v) for v in empty.metrics.values())


def test_log_ratio_cap_keeps_low_precision_finite():
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([[-200.0, -1.0]], dtype=torch.bfloat16)  # a ratio of e^200 would overflow even float64
    for level in LEVELS:
        out = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), level, ref_logp=old, beta=0.1)
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert out.loss.dtype == torch.float32
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert out.metrics["ratio_max"] <= math.exp(20.0) * (1 + 1e-6)


# GSPO-token with per-token advantages is a stop-gradient surrogate whose gradient is not the derivative of
# its value (checked by hand above), so it is gradchecked with per-sequence advantages.
@pytest.mark.parametrize(
    "level, per_token_adv, eps, scale",
    [
        ("sequence", False, (0.02, 0.03), 0.3),
        ("sequence_token", False, (0.02, 0.03), 0.3),
        ("token", True, (0.2, 0.25), 0.5),
    ],
)
def test_gradcheck(level, per_token_adv, eps, scale):
    logp, old, adv, mask, ref = batch(4, B=5, T=4, scale=scale, per_token_adv=per_token_adv)

    def f(lp):
        return policy_loss(lp, old, adv, mask, level, *eps, ref_logp=ref, beta=0.1).loss

    assert 0 < policy_loss(logp, old, adv, mask, level, *eps).metrics["clip_frac"] < 1
    assert torch.autograd.gradcheck(f, (logp.detach().requires_grad_(),))


def test_bad_arguments_are_rejected():
    logp, old, adv, mask, _ref = batch(5, per_token_adv=True)
    with pytest.raises(ValueError, match="level"):
        policy_loss(logp, old, adv, mask, "seq")
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logp, old, adv, mask, "sequence")  # GSPO has one advantage per sequence
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, "token", beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp, old[:, :-1], adv, mask, "token")


# --- independent references -------------------------------------------------------------------


def loop_reference(logp, old, adv, mask, level, eps_low, eps_high, ref, beta):
    """The objective written out per sequence on python floats (float64), sharing no code with gspo.loss."""
    total, kl_total = 0.0, 0.0
    for i in range(len(mask)):
        idx = [j for j, keep in enumerate(mask[i]) if keep]
        if not idx:
            continue  # contributes zero, still counted in the mean over sequences
        a = [adv[i] if not isinstance(adv[i], list) else adv[i][j] for j in idx]
        s = math.exp(sum(logp[i][j] - old[i][j] for j in idx) / len(idx))
        ratios = [s] * len(idx) if level != "token" else [math.exp(logp[i][j] - old[i][j]) for j in idx]
        terms = [min(r * aj, min(max(r, 1 - eps_low), 1 + eps_high) * aj) for r, aj in zip(ratios, a)]
        total += terms[0] if level == "sequence" else sum(terms) / len(terms)
        kl_total += sum(k3(ref[i][j] - logp[i][j]) for j in idx) / len(idx)
    return -total / len(mask) + beta * kl_total / len(mask)


@pytest.mark.parametrize(
    "level, per_token_adv, eps",
    [
        ("sequence", False, (3e-4, 4e-4)),
        ("sequence_token", False, (3e-4, 4e-4)),
        ("sequence_token", True, (3e-4, 4e-4)),
        ("token", False, (0.2, 0.2)),
        ("token", True, (0.2, 0.28)),
    ],
)
def test_matches_float64_loop(level, per_token_adv, eps):
    logp, old, adv, mask, ref = batch(6, scale=1e-3 if level != "token" else 0.3, per_token_adv=per_token_adv)
    out = policy_loss(logp, old, adv, mask, level, *eps, ref_logp=ref, beta=0.04)
    expected = loop_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), level, *eps, ref.tolist(), 0.04)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def trl_compute_loss(level, logp, old, adv, mask, eps_low, eps_high, ref, beta):
    """TRL 1.16 GRPOTrainer._compute_loss run on given tensors.

    The method only reads configuration from `self` and gets log-probs from the model through
    `_get_per_token_logps_and_entropies`; a namespace holding that configuration and handing back
    `logp` lets TRL's own loss code run unchanged on our tensors. Conventions, ours vs TRL:
    - our normalisation is TRL's loss_type="grpo" (token mean per sequence, then mean over sequences);
      TRL's default "dapo" (and "bnpo") divide by the total token count, which weights a sequence by its
      length and, at sequence level, is no longer GSPO's per-sequence objective (TRL warns about it);
    - TRL's sequence level keeps ratios as (B, 1) and broadcasts the per-sequence loss over the mask, which
      is our per-sequence mean; a sequence with no tokens adds zero and counts in B in both;
    - TRL has no GSPO-token level (checked through its equality with GSPO instead) and an optional
      second clip `delta` we do not have; its k3 KL per token is the same as ours.
    """
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")

    def identity(x, **_):
        return x

    config = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        importance_sampling_level=level,
        loss_type="grpo",
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        beta=beta,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity),
    )
    B = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    loss = trainer.GRPOTrainer._compute_loss(config, None, inputs)
    return loss, {k: v[-1] for k, v in config._metrics["train"].items()}


@pytest.mark.parametrize("level, eps, scale", [("sequence", (3e-4, 4e-4), 1e-3), ("token", (0.2, 0.28), 0.3)])
def test_matches_trl(level, eps, scale):
    logp, old, adv, mask, ref = batch(7, scale=scale)
    trl_loss, trl_metrics = trl_compute_loss(level, logp, old, adv, mask, *eps, ref, 0.04)
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)
    out, grad = loss_and_grad(
        logp, old, adv, mask, level=level, eps_low=eps[0], eps_high=eps[1], ref_logp=ref, beta=0.04
    )
    assert 0 < out.metrics["clip_frac"] < 1
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert torch.allclose(grad, trl_grad, rtol=0, atol=1e-6)
    # TRL logs kl as a token-weighted mean; ours is the quantity in the loss (per-sequence mean, then mean), so
    # compare it with what TRL's KL term adds to TRL's loss
    trl_no_kl, _ = trl_compute_loss(level, logp, old, adv, mask, *eps, ref, 0.0)
    assert out.metrics["kl"] == pytest.approx((trl_loss - trl_no_kl).item() / 0.04, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(trl_no_kl.item(), abs=1e-6)
    assert out.metrics["clip_frac"] == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-6)
    assert out.metrics["clip_frac_low"] == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=1e-6)
    assert out.metrics["clip_frac_high"] == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_zero_advantage_rows_have_zero_gradient(level):
    """Why the trainer may skip rows whose advantage is zero when there is no KL term: they change nothing."""
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(4, 5, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(4, 5, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    adv = t([0.7, 0.0, -1.2, 0.0])
    policy_loss(logp, old, adv, mask, level).loss.backward()
    assert torch.equal(logp.grad[[1, 3]], torch.zeros(2, 5, dtype=F64))
    assert logp.grad[[0, 2]].abs().sum() > 0
