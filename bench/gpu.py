"""Full-parameter GSPO on one Hopper GPU: peak memory, update-phase MFU and rollout decode speed.

Random-initialised models with the published Qwen2.5-0.5B, 1.5B and 7B architectures (config values only, no
weights) each run whole GSPO steps through the trainer's own phases: `gspo.trainer.rollout` samples group_size
completions of exactly new_tokens tokens for each of prompts_per_step random prompts (with gspo.decode as
configured: auto is the static-cache compiled decoder on CUDA), rewards are half 0 and half 1 in every group in
a seeded order, `group_advantages` normalises them, then `gspo.update`: the minibatch plan, old log-probs in bf16
with fp32 logits in the update's passes (`logprobs`), and `run_updates` (num_minibatches clipped updates, finite
guard, grad clip, 8-bit AdamW with stochastic rounding of the bf16 weights, `gspo.optim.make_optimizer`); its
first update is run apart so its ratio statistics can be shown (exactly 1, nothing clipped, on any dtype).
Weights are bf16 (`resolve_dtype`), activation checkpointing is on. `--config` takes the gspo / optim / model
sections of a training config instead (configs/qwen2.5-7b-h100.yaml: 32 prompts x 4 completions, 512 new
tokens, micro_batch_tokens 8192).

Ceilings are measured first on the same device: an 8192^3 bf16 matmul (FLOP/s) and a device-to-device copy of
about 4 GB (bytes read + written per second). Per model the script reports
  - peak memory over all steps (max allocated and max reserved), under a per-process cap of --memory-cap-gb
    (80 GB by default), so "fits 80 GB: yes" on a larger card means the steps ran inside 80 GB;
  - the last step's time by phase: rollout, old log-probs, update, and within the update the optimizer steps;
  - update-phase MFU against the matmul ceiling, model FLOPs (no recompute) and hardware FLOPs (with the
    checkpointed layers' forward recomputed);
  - decode tokens/s against the memory-bandwidth bound: every decode step must read all weights once (the
    embedding table only when tied, as the LM head) and the KV cache so far, at the measured copy bandwidth.
Timings are of the last step (the first allocates the optimizer states, compiles and warms the kernels).

    PYTHONPATH=. python bench/gpu.py --out gpu.json      # --models 0.5b,1.5b,7b --steps 2 --group-size 8 ...
    PYTHONPATH=. python bench/gpu.py --config configs/qwen2.5-7b-h100.yaml --models 7b --prompt-len 192
    python bench/gpu.py --smoke --out /tmp/gpu.json       # a tiny Qwen2 on the CPU: the same code path

A model that fails (out of memory included) is recorded and the next one runs; the JSON is rewritten after
every model. The last line is `ratio=<decode tokens/s over the bandwidth bound, for the largest model that ran>`.
"""

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gspo import metrics
from gspo.advantages import group_advantages
from gspo.config import load_config
from gspo.models import fp32_logits, prepare_for_training, resolve_dtype
from gspo.optim import make_optimizer, make_scheduler
from gspo.rollout import resolve_decode
from gspo.trainer import rollout
from gspo.update import logprobs, make_plan, run_updates

# From each model's config.json on the Hugging Face hub (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B);
# all three also have rope_theta 1e6, rms_norm_eps 1e-6 and no sliding window. The 7B's vocabulary is padded
# to 152064 rows, the smaller two have 151936. PUBLISHED_PARAMS are the hub's safetensors totals.
ARCHS = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    # --smoke: the same code on the CPU in seconds
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
PUBLISHED_PARAMS = {"0.5b": 494_032_768, "1.5b": 1_543_714_304, "7b": 7_615_616_512}
GB = 1e9


def qwen2_config(name: str):
    from transformers import Qwen2Config

    return Qwen2Config(
        **ARCHS[name],
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """Random weights made directly on `device` in `dtype`: no fp32 copy on the host first."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(qwen2_config(name), dtype=dtype)


def word_tokenizer(vocab: int):
    """A real tokenizer whose tokens are the model's ids spelled `t<id>`, plus an EOS the model cannot emit
    (id = vocab, past its last logit), so every completion runs to exactly max_new_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab
    tk = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="t0", padding_side="left")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int) -> list[float]:
    """Seconds per call of fn after warm-up; CUDA events on the GPU, so no host round trip is in the time."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def ceilings(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """The two ceilings on this device: dense matmul FLOP/s and copy bandwidth (bytes read + written)."""
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm = timed(functools.partial(torch.matmul, a, b), device, 3, 10)
    del a, b
    elems = (1 << 22) if smoke else (1 << 30)  # 4.3 GB of fp32 on the GPU, under 2^31 elements
    src = torch.randn(elems, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    cp = timed(functools.partial(dst.copy_, src), device, 3, 10)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    free(device)
    return {
        "matmul_n": n,
        "matmul_flops": 2 * n**3 / statistics.median(mm),
        "matmul_s": mm,
        "copy_bytes": nbytes,
        "copy_bytes_per_s": nbytes / statistics.median(cp),
        "copy_s": cp,
    }


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def counts(model) -> dict:
    """Matmul weights (decoder layers; the LM head apart) and the bytes one decode step must read."""
    cfg = model.config
    linears = [
        (n, m) for layer in model.model.layers for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    body = sum(m.weight.numel() for _, m in linears)
    # Non-reentrant checkpointing stops recomputing once the tensors the backward needs are back: each layer's
    # last matmul (down_proj, whose saved input is recomputed before it) is not run again.
    last = sum(m.weight.numel() for n, m in linears if n.endswith("down_proj"))
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    elt = next(model.parameters()).element_size()
    embed = model.model.embed_tokens.weight.numel()
    # An untied embedding table is only indexed (B rows per step); tied, it is read whole as the LM head.
    weight_read = (total - (0 if cfg.tie_word_embeddings else embed)) * elt
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elt  # K and V, every layer
    return {
        "params": total,
        "matmul_params_body": body,
        "matmul_params_recomputed": body - last,
        "matmul_params_head": model.lm_head.weight.numel(),
        "weight_bytes_read_per_step": weight_read,
        "kv_bytes_per_token": kv_per_token,
    }


def update_flops(c: dict, cfg, rows: int, seq: int, kept: int, checkpointing: bool) -> dict:
    """FLOPs of `rows` sequences of `seq` tokens, LM head on the last `kept` positions: one forward, and
    forward + backward as the model needs them (model) and as the GPU runs them with checkpointing (hardware).

    forward = 2 FLOPs per matmul weight per token + attention's two seq x seq products, 4 * layers * hidden *
    seq^2 per sequence (PaLM's convention: the half the causal mask makes needless is counted); model = 3 x
    forward (the backward is twice the forward); hardware = model + each decoder layer's forward again but its
    down_proj (checkpoint recompute). Both equal torch's FlopCounterMode count (tests/test_bench_gpu.py).
    """
    width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)  # of the query heads together
    attn = 4 * cfg.num_hidden_layers * width * seq * seq
    forward = rows * (2 * c["matmul_params_body"] * seq + attn + 2 * c["matmul_params_head"] * kept)
    recompute = rows * (2 * c["matmul_params_recomputed"] * seq + attn) if checkpointing else 0
    return {"forward": forward, "model": 3 * forward, "hardware": 3 * forward + recompute}


def decode_bound(c: dict, rows: int, prompt_len: int, new_tokens: int, bandwidth: float) -> float:
    """Tokens/s if each of the new_tokens forward passes only read the weights and the KV cache so far."""
    # Pass t (0 = prefill) attends over prompt_len + t positions; weights are read once per pass.
    kv = sum(rows * (prompt_len + t) * c["kv_bytes_per_token"] for t in range(new_tokens))
    total = new_tokens * c["weight_bytes_read_per_step"] + kv
    return rows * new_tokens / (total / bandwidth)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "max_allocated": torch.cuda.max_memory_allocated(device),
        "max_reserved": torch.cuda.max_memory_reserved(device),
    }


def gspo_step(model, tok, opt, sched, cfg, device, prompts: list[str], step: int) -> dict:
    """One rollout batch and its num_minibatches updates through the trainer's own phases (gspo.trainer.rollout,
    gspo.update.make_plan / logprobs / run_updates); phase times in s, the optimizer steps timed by hooks. The
    first update runs on its own, so its loss statistics are the on-policy update's alone."""
    g = cfg.gspo
    B = g.prompts_per_step * g.group_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt_s = []

    def started(*_):
        sync(device)
        opt_s.append(-time.perf_counter())

    def finished(*_):
        sync(device)
        opt_s[-1] += time.perf_counter()

    hooks = [opt.register_step_pre_hook(started), opt.register_step_post_hook(finished)]
    sync(device)
    t0 = time.perf_counter()
    roll = rollout(model, tok, prompts, cfg, step, 0, B)
    sync(device)
    t1 = time.perf_counter()
    # Half of every group right, half wrong, in a seeded order: every advantage is non-zero, every row trains.
    gen = torch.Generator().manual_seed(step)
    reward = torch.cat([torch.randperm(g.group_size, generator=gen) % 2 for _ in range(g.prompts_per_step)]).float()
    adv, _ = group_advantages(reward, g.group_size)
    adv = adv.to(device)
    plan = make_plan(roll, adv, cfg, step, 0, B)
    old_logp = logprobs(model, roll, plan, g.temperature)
    sync(device)
    t2 = time.perf_counter()
    first = run_updates(model, opt, sched, params, roll, adv, old_logp, None, plan[:1], cfg)
    rest = run_updates(
        model, opt, sched, params, roll, adv, old_logp, None, plan[1:], cfg, norm_before=first.norm, first_update=1
    )
    sync(device)
    t3 = time.perf_counter()
    for h in hooks:
        h.remove()
    on_policy = metrics.finish(first.stats)
    return {
        "rollout_s": t1 - t0,
        "old_logp_s": t2 - t1,
        "update_s": t3 - t2,
        "optimizer_s": sum(opt_s),
        "optimizer_share_of_update": sum(opt_s) / (t3 - t2),
        "step_s": t3 - t0,
        "first_update": {k: on_policy[k] for k in ("ratio_min", "ratio_max", "clip_frac")},
        "completion_tokens": int(roll.completion_mask.sum()),
        "completion_width": roll.completion_ids.shape[1],
        "micro_batches": sum(len(mb.micro) for mb in plan),
        "updates_applied": sum(first.finite + rest.finite),
    }


def run_model(name: str, args, cfg, device: torch.device, ceil: dict, log) -> dict:
    g = cfg.gspo
    dtype = resolve_dtype(cfg.model.dtype, device)
    t = time.perf_counter()
    model = build_model(name, device, dtype)
    model = prepare_for_training(fp32_logits(model), cfg.model)
    c = counts(model)
    tok = word_tokenizer(model.config.vocab_size)
    model.generation_config.eos_token_id = tok.eos_token_id  # the only EOS, and one the model cannot emit
    model.generation_config.pad_token_id = tok.pad_token_id
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    sched = make_scheduler(opt, cfg.optim, args.steps * g.num_minibatches)
    res = {
        "arch": ARCHS[name],
        "published_params": PUBLISHED_PARAMS.get(name),
        **c,
        "dtype": str(dtype),
        "optimizer": type(opt).__module__ + "." + type(opt).__name__,
        "decode": resolve_decode(g.decode, model),
        "build_s": time.perf_counter() - t,
        "weights_bytes": memory(device).get("allocated"),
    }
    log(
        f"[{name}] {fmt_params(c['params'])} params, built in {res['build_s']:.1f} s ({res['optimizer']}, "
        f"{res['decode']} decoding)"
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (g.prompts_per_step, args.prompt_len), generator=gen)  # 0: pad
    prompts = [" ".join(f"t{i}" for i in row) for row in ids.tolist()]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for s in range(args.steps):
        steps.append(gspo_step(model, tok, opt, sched, cfg, device, prompts, s) | memory(device))
        if s == 0:
            res["optimizer_state_bytes"] = sum(
                v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
            )
        m = steps[-1]
        log(
            f"[{name}] step {s + 1}/{args.steps}: rollout {m['rollout_s']:.2f} s, "
            f"old log-probs {m['old_logp_s']:.2f} s, "
            f"update {m['update_s']:.2f} s (optimizer {m['optimizer_s']:.2f} s), "
            f"peak so far {gb(m.get('max_allocated'))} GB; first update: ratio {m['first_update']['ratio_min']!r} "
            f"to {m['first_update']['ratio_max']!r}, clipped {m['first_update']['clip_frac']!r}"
        )
    res["steps"] = steps
    last = steps[-1]
    rows = g.prompts_per_step * g.group_size
    P, T = args.prompt_len, g.max_new_tokens
    res["peak_allocated_bytes"] = last.get("max_allocated")
    res["peak_reserved_bytes"] = last.get("max_reserved")
    res["fits_80gb"] = None if last.get("max_reserved") is None else last["max_reserved"] <= 80 * GB
    # Decode: every row must run all T tokens, or the token counts below would not be what was decoded.
    res["all_rows_full_length"] = last["completion_tokens"] == rows * T
    res["decode_tokens_per_s"] = last["completion_tokens"] / last["rollout_s"]
    res["decode_bound_tokens_per_s"] = decode_bound(c, rows, P, T, ceil["copy_bytes_per_s"])
    res["decode_fraction_of_bound"] = res["decode_tokens_per_s"] / res["decode_bound_tokens_per_s"]
    # Update phase: each row once forward and backward at width P + T, LM head on T + 1 positions.
    f = update_flops(c, model.config, rows, P + T, T + 1, cfg.model.gradient_checkpointing)
    peak = ceil["matmul_flops"]
    res["update_model_flops"], res["update_hardware_flops"] = f["model"], f["hardware"]
    res["update_mfu_model"] = f["model"] / last["update_s"] / peak
    res["update_mfu_hardware"] = f["hardware"] / last["update_s"] / peak
    res["old_logp_mfu"] = f["forward"] / last["old_logp_s"] / peak
    res["flops_formula"] = update_flops.__doc__.split("\n\n")[1].replace("\n    ", " ").strip()
    log(
        f"[{name}] peak {gb(res['peak_allocated_bytes'])} GB allocated, {gb(res['peak_reserved_bytes'])} GB reserved: "
        f"fits 80 GB: {yes_no(res['fits_80gb'])}"
    )
    return res


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpu-", suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, out)


def gb(x) -> str:
    return "n/a" if x is None else f"{x / GB:.1f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def yes_no(x) -> str:
    return {True: "yes", False: "no", None: "n/a"}[x]


def table(results: dict) -> str:
    head = [
        "model",
        "params",
        "peak alloc GB",
        "peak resv GB",
        "fits 80 GB",
        "rollout s",
        "decode tok/s",
        "bound tok/s",
        "of bound",
        "old logp s",
        "update s",
        "optimizer s",
        "MFU model",
        "MFU hw",
        "1st update ratio / clip",
    ]
    lines = [head, ["---"] * len(head)]
    for name, r in results.items():
        if "error" in r:
            error = r["error"].splitlines()[0][:80]
            lines.append([name, "-", "-", "-", "no" if r.get("oom") else "-", "error: " + error])
            continue
        s = r["steps"][-1]
        f = s["first_update"]
        lines.append(
            [
                name,
                fmt_params(r["params"]),
                gb(r["peak_allocated_bytes"]),
                gb(r["peak_reserved_bytes"]),
                yes_no(r["fits_80gb"]),
                f"{s['rollout_s']:.2f}",
                f"{r['decode_tokens_per_s']:.0f}",
                f"{r['decode_bound_tokens_per_s']:.0f}",
                f"{r['decode_fraction_of_bound']:.3f}",
                f"{s['old_logp_s']:.2f}",
                f"{s['update_s']:.2f}",
                f"{s['optimizer_s']:.2f}",
                f"{r['update_mfu_model']:.3f}",
                f"{r['update_mfu_hardware']:.3f}",
                f"{f['ratio_min']!r}..{f['ratio_max']!r} / {f['clip_frac']!r}",
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.5b,1.5b,7b", help=f"comma-separated, of {', '.join(PUBLISHED_PARAMS)}")
    ap.add_argument(
        "--config",
        default=None,
        help="a training config whose gspo, optim and model sections are used "
        "(its batch, lengths, optimizer, dtype); the model is --models",
    )
    ap.add_argument("--group-size", type=int, default=None, help="default 8, or the config's")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step: default 1, or the config's")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 or the config's (16 with --smoke)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (16 with --smoke)")
    ap.add_argument("--steps", type=int, default=2, help="GSPO steps per model; the last one is timed")
    ap.add_argument("--memory-cap-gb", type=float, default=80.0, help="per-process GPU memory cap; 0 for none")
    ap.add_argument("--out", default=None, help="JSON of all numbers, rewritten after every model")
    ap.add_argument("--smoke", action="store_true", help="a tiny Qwen2 (not --models) in fp32 on the CPU, one thread")
    args = ap.parse_args(argv)
    args.prompt_len = args.prompt_len or (16 if args.smoke else 128)
    names = ["tiny"] if args.smoke else [n.strip().lower() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in PUBLISHED_PARAMS and not args.smoke]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(PUBLISHED_PARAMS)})")
    if args.smoke:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        ap.error("no CUDA device; --smoke runs the same code on the CPU")

    def log(msg):
        print(msg, flush=True)

    base = (
        []
        if args.config
        else [
            "gspo.group_size=8",
            "gspo.prompts_per_step=1",
            "gspo.max_new_tokens=512",
            "gspo.num_minibatches=4",
            "gspo.temperature=1.0",
            "optim.optimizer=adamw8bit",
            "model.gradient_checkpointing=true",
        ]
    )
    given = [
        f"gspo.group_size={args.group_size}" if args.group_size else None,
        f"gspo.prompts_per_step={args.prompts}" if args.prompts else None,
        f"gspo.max_new_tokens={16 if args.smoke else args.new_tokens}" if args.smoke or args.new_tokens else None,
    ]
    cfg = load_config(args.config, base + [x for x in given if x] + [f"gspo.max_prompt_length={args.prompt_len}"])
    args.new_tokens = cfg.gspo.max_new_tokens
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:  # then make_optimizer fails for every model, and each records why
        bnb_version = None
    data = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version,
        "python": sys.version.split()[0],
        "smoke": args.smoke,
        "settings": {
            "models": names,
            "config": args.config,
            "group_size": cfg.gspo.group_size,
            "prompts_per_step": cfg.gspo.prompts_per_step,
            "decode": cfg.gspo.decode,
            "dtype": cfg.model.dtype,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "steps": args.steps,
            "num_minibatches": cfg.gspo.num_minibatches,
            "micro_batch_tokens": cfg.optim.micro_batch_tokens,
            "temperature": cfg.gspo.temperature,
            "optimizer": cfg.optim.optimizer,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "memory_cap_gb": args.memory_cap_gb,
        },
        "models": {},
    }
    log(
        f"device: {data['device']}, torch {data['torch']}, transformers {data['transformers']}, "
        f"bitsandbytes {bnb_version}"
    )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        data["device_memory_bytes"] = total
        if args.memory_cap_gb > 0:
            # Caps what the caching allocator may reserve: on a larger card an 80 GB cap proves the run fits 80 GB.
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * GB / total), device)
    t = time.perf_counter()
    ceil = ceilings(device, resolve_dtype(cfg.model.dtype, device), args.smoke)
    data["ceilings"] = ceil
    log(
        f"ceilings: matmul {ceil['matmul_flops'] / 1e12:.4g} TFLOP/s, copy {ceil['copy_bytes_per_s'] / 1e12:.4g} TB/s "
        f"(read + written) in {time.perf_counter() - t:.1f} s"
    )
    write_json(args.out, data)
    for name in names:
        t = time.perf_counter()
        try:
            data["models"][name] = run_model(name, args, cfg, device, ceil, log)
        except Exception as e:  # out of memory included: record it and go on with the next model
            data["models"][name] = {
                "error": f"{type(e).__name__}: {e}",
                "oom": isinstance(e, torch.OutOfMemoryError),
                "traceback": traceback.format_exc(),
                **memory(device),
            }
            log(f"[{name}] failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        data["models"][name]["wall_s"] = time.perf_counter() - t
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        write_json(args.out, data)
    ran = [r for r in data["models"].values() if "error" not in r]
    print(table(data["models"]), flush=True)
    if not ran:
        print("ratio=nan", flush=True)
        return 1
    largest = max(ran, key=lambda r: r["params"])
    print(f"ratio={largest['decode_fraction_of_bound']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
