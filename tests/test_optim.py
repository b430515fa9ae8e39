"""bf16 weights must take the small steps of fine-tuning: an Adam step of about lr is far below half a bf16 ulp
of most weights, so round-to-nearest writes lose it (the `nearest` rows show the checks would catch that)."""

import pytest
import torch

from gspo.config import OptimConfig, load_config
from gspo.optim import make_optimizer, stochastic_round
from gspo.sft import warm_start_optimizer

# Weights like a linear layer's (N(0, 0.02)) at the real configuration's lr, and like a norm's (near 1.0) at
# 10x that; 2,000 steps of a fixed gradient move each by ~lr per step: 49 ulps and 8 ulps of bf16.
CASES = {
    "matrix": ((256, 256), lambda s, g: 0.02 * torch.randn(s, generator=g), 3e-6),
    "norm": ((4096,), lambda s, g: 1 + 0.02 * torch.randn(s, generator=g), 3e-5),
}
STEPS = 2000
# The matrix case (65,536 weights, 2,000 steps) takes seconds per optimizer; the norm case checks the same rounding.
CASE_PARAMS = [pytest.param("matrix", marks=pytest.mark.slow), "norm"]


def realised_change(make, dtype, case, seed=0):
    """What the forward pass sees change: the weight as stored, minus its start, in fp32."""
    shape, init, lr = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w0, grad = init(shape, g), torch.randn(shape, generator=g)
    p = torch.nn.Parameter(w0.to(dtype))
    start = p.detach().float().clone()
    opt = make([p], lr)
    for _ in range(STEPS):
        p.grad = grad.to(dtype)
        opt.step()
    return p.detach().float() - start


def training_optimizer(rounding):
    return lambda params, lr: make_optimizer(params, OptimConfig(lr=lr, low_precision_update=rounding))


def warm_start(params, lr):
    cfg = load_config(None, [f"warm_start.lr={lr}", f"warm_start.steps={10 * STEPS}", "model.dtype=bfloat16"])
    return warm_start_optimizer(params, cfg)[0]  # its schedule is not stepped: the peak rate throughout


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize(
    "make, tolerance",
    [
        (training_optimizer("stochastic"), None),  # the default
        (training_optimizer("kahan"), 0.1),
        (warm_start, None),
    ],
)
def test_bf16_weights_realise_the_fp32_change(case, make, tolerance):
    ref = realised_change(make, torch.float32, case)
    got = realised_change(make, torch.bfloat16, case)
    ratio = float(got.norm() / ref.norm())
    assert 0.9 <= ratio <= 1.1, ratio
    # Stochastic rounding is unbiased: what it adds is zero-mean noise of about sqrt(steps * p) ulps per weight
    # (p = step / ulp), 12% of the change for the matrix and 31% for the norm; compensation stays within an ulp.
    err = float((got - ref).norm() / ref.norm())
    assert err < (tolerance or 0.4), err


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_round_to_nearest_loses_the_change(case):
    got = realised_change(training_optimizer("nearest"), torch.bfloat16, case)
    ref = realised_change(training_optimizer("nearest"), torch.float32, case)
    assert float(got.norm() / ref.norm()) < 0.1


def test_stochastic_rounding_is_unbiased_and_keeps_exact_values():
    x = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way from 1.0 to the next bf16 value, 1 + 2^-7
    r = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(r.mean()) - (1.0 + 2**-10)) < 5 * (2**-7) * (0.125 * 0.875 / len(x)) ** 0.5
    exact = torch.tensor([0.0, -2.5, 1.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round(exact).float(), exact)
    assert stochastic_round(torch.tensor([float("nan")])).isnan().all()


def test_resumed_optimizer_rounds_as_the_uninterrupted_one():
    shape, init, lr = CASES["matrix"]
    g = torch.Generator().manual_seed(1)
    w0, grad = init(shape, g), torch.randn(shape, generator=g)

    def run(steps, p, opt):
        for _ in range(steps):
            p.grad = grad.bfloat16()
            opt.step()

    a = torch.nn.Parameter(w0.bfloat16())
    opt_a = training_optimizer("stochastic")([a], lr)
    run(6, a, opt_a)
    b = torch.nn.Parameter(w0.bfloat16())
    opt_b = training_optimizer("stochastic")([b], lr)
    run(3, b, opt_b)
    saved, b_saved = opt_b.state_dict(), b.detach().clone()
    c = torch.nn.Parameter(b_saved)
    opt_c = training_optimizer("stochastic")([c], lr)
    opt_c.load_state_dict(saved)
    run(3, c, opt_c)
    assert torch.equal(a.detach(), c.detach())
