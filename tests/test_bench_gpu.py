"""bench/gpu.py: the published Qwen2.5 architectures, FLOP formulas that agree with torch's counter, and the whole
GPU code path run on the CPU with a tiny model (`--smoke`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gspo.config import load_config
from gspo.models import prepare_for_training
from gspo.rollout import token_logprobs

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu(load_bench):
    return load_bench("gpu")


@pytest.mark.parametrize("name", ["0.5b", "1.5b", "7b"])
def test_architectures_have_the_published_parameter_counts(gpu, name):
    model = gpu.build_model(name, torch.device("meta"), torch.bfloat16)
    assert gpu.counts(model)["params"] == gpu.PUBLISHED_PARAMS[name]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name != "7b")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flop_formulas_equal_torchs_count(gpu, checkpointing):
    torch.manual_seed(0)
    model = gpu.build_model("tiny", torch.device("cpu"), torch.float32)
    model.set_attn_implementation("eager")  # attention as plain matmuls, which the counter sees on the CPU
    model = prepare_for_training(model, load_config(None, [f"model.gradient_checkpointing={checkpointing}"]).model)
    rows, P, T = 3, 10, 7
    pids, cids = torch.randint(1, 1000, (rows, P)), torch.randint(1, 1000, (rows, T))
    f = gpu.update_flops(gpu.counts(model), model.config, rows, P + T, T + 1, checkpointing)
    with FlopCounterMode(display=False) as fwd:
        logp, _ = token_logprobs(model, pids, torch.ones_like(pids), cids, torch.ones_like(cids))
    with FlopCounterMode(display=False) as bwd:
        logp.sum().backward()
    # Some transformers versions compute the rotary angles with a tiny matmul (head_dim / 2 x seq): within 1e-3.
    assert fwd.get_total_flops() == pytest.approx(f["forward"], rel=1e-3)
    expected = f["hardware"] if checkpointing else f["model"]
    assert fwd.get_total_flops() + bwd.get_total_flops() == pytest.approx(expected, rel=1e-3)
    assert (f["hardware"] > f["model"]) == checkpointing


def test_smoke_runs_the_whole_step(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    ratio = float(lines[-1].removeprefix("ratio="))
    assert lines[-1].startswith("ratio=") and 0 < ratio < 1
    assert lines[-3].startswith("| --- |") and lines[-2].startswith("| tiny |")
    data = json.loads(out.read_text())
    r = data["models"]["tiny"]
    assert "error" not in r, r.get("traceback")
    assert r["all_rows_full_length"] and r["decode_fraction_of_bound"] == pytest.approx(ratio, abs=1e-4)
    assert r["optimizer"].endswith("RoundingAdamW")
    s = data["settings"]
    for step in r["steps"]:
        assert step["completion_tokens"] == s["group_size"] * s["new_tokens"]
        assert step["micro_batches"] == s["num_minibatches"] and step["updates_applied"] == s["num_minibatches"]
        assert 0 < step["optimizer_s"] < step["update_s"]
    assert r["optimizer_state_bytes"] > 0 and 0 < r["update_mfu_model"] < r["update_mfu_hardware"]
