import math
import warnings

import pytest
import torch

from gspo.advantages import group_advantages


def test_hand_values_and_flat_group_counted():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    a, n_flat = group_advantages(rewards, group_size=4, eps=1e-6)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 3: mean 0.25, std sqrt(0.75 / 3) = 0.5
    s1 = math.sqrt(1.0 / 3.0) + 1e-6
    s3 = 0.5 + 1e-6
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0, 0, 0, 0, -0.25 / s3, -0.25 / s3, -0.25 / s3, 0.75 / s3]
    assert a.dtype == torch.float64
    assert torch.allclose(a, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert n_flat == 1


def test_equal_rewards_give_exact_zeros_even_when_the_mean_is_inexact():
    # mean([0.1] * 3) is not exactly 0.1 in binary floating point
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 0.7, 0.2, 0.1])
    a, n_flat = group_advantages(rewards, group_size=3)
    assert n_flat == 2
    assert torch.equal(a[:6], torch.zeros(6))
    assert (a[6:] != 0).all() and torch.isfinite(a).all()


def test_group_size_one_gives_zeros_without_nan_or_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, n_flat = group_advantages(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64), group_size=1)
    assert a.dtype == torch.float64
    assert torch.equal(a, torch.zeros(3, dtype=torch.float64))
    assert n_flat == 3


def test_integer_rewards_are_accepted():
    a, n_flat = group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2)
    assert a.is_floating_point() and n_flat == 1
    assert a[0] > 0 > a[1] and torch.equal(a[2:], torch.zeros(2, dtype=a.dtype))


def test_agrees_with_trl_group_normalisation():
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 8, generator=g, dtype=torch.float64)
    rewards[8:16] = 1.0  # one flat group
    # TRL (GRPOTrainer, scale_rewards="group"): (r - group mean) / (nanstd(group) + 1e-4)
    grouped = rewards.view(-1, 8)
    trl = ((grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1)[:, None] + 1e-4)).flatten()
    a, n_flat = group_advantages(rewards, group_size=8, eps=1e-4)
    assert n_flat == 1
    # nanstd computes its Bessel factor count / (count - 1) in float32, hence ~1e-8 apart rather than 1e-16
    assert torch.allclose(a, trl, rtol=0, atol=1e-7)


@pytest.mark.parametrize("rewards, group_size", [(torch.zeros(5), 2), (torch.zeros(2, 2), 2), (torch.zeros(4), 0)])
def test_bad_shapes_are_rejected(rewards, group_size):
    with pytest.raises(ValueError, match="group_advantages"):
        group_advantages(rewards, group_size)


def test_non_finite_reward_is_rejected_with_its_index():
    with pytest.raises(ValueError, match=r"indices \[2\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), group_size=2)
