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


@pytest.mark.slow  # a bench run in miniature: builds, trains and times the whole step
@pytest.mark.parametrize("config", [None, "configs/qwen2.5-7b-h100.yaml"])
def test_smoke_runs_the_whole_step(tmp_path, config):
    """The default settings (fp32 on the CPU) and the real configuration's (bf16, 32 prompts x 4 completions,
    micro_batch_tokens 8192, 8-bit AdamW with stochastic rounding) on the tiny architecture: every phase runs,
    and the first update of every step is exactly on-policy."""
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)] + (["--config", config] if config else []),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    ratio = float(lines[-1].removeprefix("ratio="))
    assert lines[-1].startswith("ratio=") and 0 < ratio < 1
    assert lines[-3].startswith("| --- |") and lines[-2].startswith("| tiny |")
    data = json.loads(out.read_text())
    r = data["models"]["tiny"]
    assert "error" not in r, r.get("traceback")
    assert r["all_rows_full_length"] and r["decode_fraction_of_bound"] == pytest.approx(ratio, abs=1e-4)
    assert r["optimizer"].endswith("RoundingAdamW") and r["decode"] == "eager"  # auto: eager on the CPU
    s = data["settings"]
    assert (s["prompts_per_step"], s["group_size"], s["dtype"]) == ((32, 4, "bfloat16") if config else (1, 8, "auto"))
    assert r["dtype"] == ("torch.bfloat16" if config else "torch.float32")
    for step in r["steps"]:
        assert step["completion_tokens"] == s["prompts_per_step"] * s["group_size"] * s["new_tokens"]
        assert step["micro_batches"] == s["num_minibatches"] and step["updates_applied"] == s["num_minibatches"]
        assert 0 < step["optimizer_s"] < step["update_s"]
        assert step["first_update"] == {"ratio_min": 1.0, "ratio_max": 1.0, "clip_frac": 0.0}
    assert r["optimizer_state_bytes"] > 0 and 0 < r["update_mfu_model"] < r["update_mfu_hardware"]


@pytest.mark.slow  # the GPU check script end to end, in subprocesses
def test_gpu_check_smoke_runs_both_parts_and_writes_dated_results(tmp_path):
    """bench/gpu_check.sh --smoke: the prepared GPU check's two parts on the CPU, results named by part, device
    and date; without --smoke and without a GPU it refuses in one line."""
    import os

    script = ROOT / "bench" / "gpu_check.sh"
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (decode,), (step,) = sorted(tmp_path.glob("decode-cpu-*.json")), sorted(tmp_path.glob("step-cpu-*.json"))
    assert decode.with_suffix(".log").read_text().strip().splitlines()[-1].startswith("ratio=")
    d, s = json.loads(decode.read_text()), json.loads(step.read_text())
    assert set(d["models"]["tiny"]["rows"]) == {"4", "12"} and d["exactness_fp32"]["static_changed_with_weights"]
    assert s["settings"]["config"] == "configs/qwen2.5-7b-h100.yaml" and s["settings"]["prompts_per_step"] == 32
    assert s["models"]["tiny"]["steps"][-1]["first_update"] == {"ratio_min": 1.0, "ratio_max": 1.0, "clip_frac": 0.0}
    if not torch.cuda.is_available():
        bare = subprocess.run(
            ["bash", str(script), "--out", str(tmp_path / "gpu")], capture_output=True, text=True, timeout=120, env=env
        )
        assert bare.returncode == 2 and bare.stderr.strip() == (
            "gpu_check: no CUDA device; --smoke runs the same code on the CPU"
        )
