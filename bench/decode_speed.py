"""Rollout decode speed: the eager decoder against the static-cache compiled one, on the same prompts and seeds.

Random-initialised models with the published Qwen2.5 architectures (bench/gpu.py's ARCHS), their LM head in fp32
as the trainer loads every model (`gspo.models.fp32_logits`), decode `--rows` completions (a list: each count is
run in turn) of `--new-tokens` tokens for two left-padded random prompts (half the rows each, as groups do), with
temperature-1 sampling and fixed per-row seeds, through `gspo.rollout.sample` (transformers DynamicCache, eager)
and `gspo.static_decode.sample_static` (StaticCache in row and length buckets, one-token step compiled with CUDA
graphs). The EOS is an id the model cannot emit, so every row decodes every token. Per model and row count it
prints
  - tokens/s of each decoder (eager over its first --eager-tokens tokens: it is bound by the host, the same per
    token at any length; static: its second call, the first call's extra time is reported as compile time), the
    bandwidth bound bench/gpu.py computes (weights and KV cache read once per token, measured copy rate), and the
    peak GPU memory of the static decode;
  - agreement: bf16 kernels differ between the two, so a row's samples can part at some token and differ after
    it; the first such step (per row), the fraction of identical tokens and the largest log-prob difference
    before it are reported, not asserted, for static against eager (over the eager tokens) and, with
    --repeat-check, for two static calls;
  - exactness in fp32 on the first model at the largest row count (--check-tokens new tokens, after the timed
    runs): static against eager, and again after an in-place weight update (as an optimizer step makes), which
    the compiled step must see.

    PYTHONPATH=. python bench/decode_speed.py      # --models 0.5b,7b --rows 8,32,128 --prompt-len 128 --new-tokens 512
    python bench/decode_speed.py --smoke            # the tiny architecture in fp32 on the CPU, step not compiled

The last line is `ratio=<static over eager tokens/s, for the largest model at the largest row count that ran>`.
"""

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu import ARCHS, build_model, ceilings, counts, decode_bound, fmt_params, sync, write_json
from gspo.models import fp32_logits
from gspo.rollout import sample
from gspo.static_decode import sample_static


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def agreement(ref, out) -> dict:
    """First step at which each row's tokens differ (the width when they never do), the fraction of identical
    tokens, and the largest log-prob difference at the steps before a row's first difference."""
    a, b = ref[0].cpu(), out[0].cpu()
    diff = a != b
    first = torch.where(diff.any(1), diff.int().argmax(1), torch.full((a.shape[0],), a.shape[1]))
    same = torch.arange(a.shape[1])[None, :] < first[:, None]
    logp = (ref[1].cpu() - out[1].cpu()).abs()[same]
    return {
        "first_divergence": first.tolist(),
        "identical_fraction": (~diff).float().mean().item(),
        "max_abs_logp_diff_before_divergence": logp.max().item() if logp.numel() else None,
    }


def said(a: dict) -> str:
    lp = a["max_abs_logp_diff_before_divergence"]
    return (
        f"{a['identical_fraction']:.3f} of tokens identical, first divergence per row {a['first_divergence']} "
        f"(median {statistics.median(a['first_divergence'])}), max |log-prob diff| before it "
        f"{'n/a' if lp is None else f'{lp:.2e}'}"
    )


def prompts(vocab: int, rows: int, width: int, device):
    """Two random prompts, the second a quarter shorter (left-padded), each continued by half the rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, width), generator=g)  # 0 is the pad id
    mask = torch.ones_like(ids)
    mask[1, : width // 4] = 0
    ids[1, : width // 4] = 0
    return ids.to(device), mask.to(device), (torch.arange(rows) * 2 // rows).to(device)


def decoders(model, rows: int, prompt_len: int, device, T: int, compile: bool, T_eager: int | None = None):
    """The two decoders on the same prompts and seeds; the EOS is past the last logit, so every row decodes T."""
    vocab = model.config.vocab_size
    ids, mask, which = prompts(vocab, rows, prompt_len, device)
    seeds = (torch.arange(rows, dtype=torch.int64) + 1000).to(device)

    def common(n: int) -> tuple:
        return (model, ids, mask, n, {vocab}, 0, 1.0, 1.0, seeds)

    return (
        lambda: sample(*common(T_eager or T), rows=which),
        lambda: sample_static(*common(T), rows=which, compile=compile),
    )


def memory_peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_rows(model, c: dict, rows: int, args, device, ceil: dict, log, name: str) -> dict:
    T, T_e = args.new_tokens, min(args.eager_tokens or args.new_tokens, args.new_tokens)
    eager, static = decoders(model, rows, args.prompt_len, device, T, args.compile, T_e)
    decoders(model, rows, args.prompt_len, device, 4, args.compile)[0]()  # warm-up: kernels, allocator
    res = {"rows": rows, "eager_tokens": T_e, "new_tokens": T}
    ref, res["eager_s"] = timed(eager, device)
    res["eager_tokens_per_s"] = rows * T_e / res["eager_s"]
    log(f"[{name} x {rows}] eager: {T_e} tokens in {res['eager_s']:.2f} s, {res['eager_tokens_per_s']:.0f} tokens/s")
    torch._dynamo.utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first, first_s = timed(static, device)  # compiles, then runs the step once plainly and records its graph
    out, res["static_s"] = timed(static, device)  # graph replays only
    res["static_peak_allocated_bytes"] = memory_peak(device)
    res["static_first_call_s"], res["compile_s"] = first_s, first_s - res["static_s"]
    res["static_tokens_per_s"] = rows * T / res["static_s"]
    res["cudagraph_skips"] = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    res["static_first_vs_second_call"] = agreement(first, out)
    if args.repeat_check:
        res["static_second_vs_third_call"] = agreement(out, static())
    res["bound_tokens_per_s"] = decode_bound(c, rows, args.prompt_len, T, ceil["copy_bytes_per_s"])
    res["static_fraction_of_bound"] = res["static_tokens_per_s"] / res["bound_tokens_per_s"]
    res["eager_fraction_of_bound"] = res["eager_tokens_per_s"] / res["bound_tokens_per_s"]
    res["ratio"] = res["static_tokens_per_s"] / res["eager_tokens_per_s"]
    peak = res["static_peak_allocated_bytes"]
    log(
        f"[{name} x {rows}] static: first call {first_s:.1f} s (compile about {res['compile_s']:.1f} s), then "
        f"{res['static_s']:.2f} s, {res['static_tokens_per_s']:.0f} tokens/s = {res['ratio']:.2f}x eager; "
        f"bound {res['bound_tokens_per_s']:.0f} tokens/s (static {res['static_fraction_of_bound']:.3f}, "
        f"eager {res['eager_fraction_of_bound']:.3f}); cudagraph skips {res['cudagraph_skips']}"
        + ("" if peak is None else f"; peak {peak / 1e9:.1f} GB")
    )
    res["static_vs_eager"] = agreement(ref, tuple(None if x is None else x[:, :T_e] for x in out))
    log(f"[{name} x {rows}] static vs eager over {T_e} tokens: {said(res['static_vs_eager'])}")
    log(f"[{name} x {rows}] static 1st vs 2nd call: {said(res['static_first_vs_second_call'])}")
    if args.repeat_check:
        log(f"[{name} x {rows}] static 2nd vs 3rd call: {said(res['static_second_vs_third_call'])}")
    return res


def run_model(name: str, args, device, dtype, ceil: dict, log, res: dict, save) -> None:
    """Fills res (the model's entry of the JSON) row count by row count, calling save() after each."""
    t = time.perf_counter()
    model = fp32_logits(build_model(name, device, dtype).eval())
    c = counts(model)
    res |= {"params": c["params"], "build_s": time.perf_counter() - t, "rows": {}}
    log(f"[{name}] {fmt_params(c['params'])} params, built in {res['build_s']:.1f} s")
    for rows in args.rows:
        try:
            res["rows"][str(rows)] = run_rows(model, c, rows, args, device, ceil, log, name)
        except Exception as e:  # out of memory or a compile failure: record it and go on
            res["rows"][str(rows)] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"[{name} x {rows}] failed: {type(e).__name__}: {str(e)[:2000]}")
        save()


def exactness(name: str, args, device, log) -> dict:
    """In fp32 the two decoders should agree token for token, before and after an in-place weight update."""
    torch.manual_seed(0)
    model = fp32_logits(build_model(name, device, torch.float32).eval())
    T = args.check_tokens
    eager, static = decoders(model, args.rows[-1], args.prompt_len, device, T, args.compile)
    before = static()
    res = {"tokens": T, "rows": args.rows[-1], "before_update": agreement(eager(), before)}
    log(f"[{name} fp32, {T} tokens] static vs eager: {said(res['before_update'])}")
    torch.manual_seed(0)
    with torch.no_grad():  # new values in the same tensors, as an optimizer step writes them
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    after = static()
    res["after_update"] = agreement(eager(), after)
    res["static_changed_with_weights"] = not torch.equal(before[0], after[0])
    log(
        f"[{name} fp32] after an in-place weight update: static vs eager: {said(res['after_update'])}; "
        f"static output changed: {res['static_changed_with_weights']}"
    )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.5b,7b", help="comma-separated, of 0.5b, 1.5b, 7b")
    ap.add_argument(
        "--rows",
        default="8,32,128",
        help="completions decoded together (two prompts, half each); a comma-separated list runs each count",
    )
    ap.add_argument(
        "--eager-tokens",
        type=int,
        default=None,
        help="new tokens the eager decoder is timed over (default: all of --new-tokens)",
    )
    ap.add_argument(
        "--repeat-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a third static call, compared with the second (CUDA graph replays repeat exactly)",
    )
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (16 with --smoke)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 (40 with --smoke)")
    ap.add_argument(
        "--check-tokens",
        type=int,
        default=64,
        help="new tokens of the fp32 exactness check on the first model; 0 skips it",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the static decoder's step (default: yes, no with --smoke)",
    )
    ap.add_argument("--out", default=None, help="JSON of all numbers, rewritten after every model")
    ap.add_argument("--smoke", action="store_true", help="the tiny architecture in fp32 on the CPU, one thread")
    args = ap.parse_args(argv)
    try:
        args.rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rows: expected comma-separated counts, got {args.rows!r}")
    if not args.rows or min(args.rows) < 2:
        ap.error("--rows: every count must be at least 2 (two prompts, half the rows each)")
    args.prompt_len = args.prompt_len or (16 if args.smoke else 128)
    args.new_tokens = args.new_tokens or (40 if args.smoke else 512)
    args.compile = (not args.smoke) if args.compile is None else args.compile
    names = ["tiny"] if args.smoke else [n.strip().lower() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARCHS or n == "tiny"] if not args.smoke else []
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (known: 0.5b, 1.5b, 7b)")
    if args.smoke:
        torch.set_num_threads(1)
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        ap.error("no CUDA device; --smoke runs the same code on the CPU")

    def log(msg):
        print(msg, flush=True)

    import transformers

    data = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"models": names, "dtype": str(dtype)},
        "models": {},
    }
    log(
        f"device: {data['device']}, torch {data['torch']}, transformers {data['transformers']}; "
        f"{args.rows} rows, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, "
        f"static step {'compiled' if args.compile else 'not compiled'}"
    )
    if args.compile:
        torch._logging.set_logs(perf_hints=True)  # says why, when torch runs a compiled step without CUDA graphs
    data["ceilings"] = ceil = ceilings(device, dtype, args.smoke)
    log(f"copy bandwidth {ceil['copy_bytes_per_s'] / 1e12:.4g} TB/s (read + written)")
    for name in names:
        t = time.perf_counter()
        data["models"][name] = {}
        try:
            run_model(name, args, device, dtype, ceil, log, data["models"][name], lambda: write_json(args.out, data))
        except Exception as e:  # a compile failure included: record it and go on with the next model
            data["models"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"[{name}] failed: {type(e).__name__}: {str(e)[:2000]}")
            log(traceback.format_exc()[-3000:])
        data["models"][name]["wall_s"] = time.perf_counter() - t
        log(f"[{name}] {data['models'][name]['wall_s']:.0f} s")
        torch._dynamo.reset()  # drops the compiled step, its CUDA graphs and with them the model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(args.out, data)
    if args.check_tokens:
        try:
            data["exactness_fp32"] = exactness(names[0], args, device, log)
        except Exception as e:
            data["exactness_fp32"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"[{names[0]} fp32] failed: {type(e).__name__}: {str(e)[:2000]}")
        write_json(args.out, data)
    ran = [
        (m["params"], int(rows), r)
        for m in data["models"].values()
        if "error" not in m
        for rows, r in m["rows"].items()
        if "error" not in r
    ]
    print(table(data["models"]), flush=True)
    if not ran:
        print("ratio=nan", flush=True)
        return 1
    print(f"ratio={max(ran, key=lambda x: x[:2])[2]['ratio']:.3f}", flush=True)
    return 0


def table(models: dict) -> str:
    head = [
        "model",
        "rows",
        "eager tok/s",
        "static tok/s",
        "compile s",
        "static of bound",
        "bound tok/s",
        "peak GB",
        "ratio",
    ]
    lines = [head, ["---"] * len(head)]
    for name, m in models.items():
        for rows, r in m.get("rows", {}).items():
            if "error" in r:
                lines.append([name, rows, "error: " + r["error"].splitlines()[0][:80]])
                continue
            peak = r["static_peak_allocated_bytes"]
            lines.append(
                [
                    name,
                    rows,
                    f"{r['eager_tokens_per_s']:.0f}",
                    f"{r['static_tokens_per_s']:.0f}",
                    f"{r['compile_s']:.1f}",
                    f"{r['static_fraction_of_bound']:.3f}",
                    f"{r['bound_tokens_per_s']:.0f}",
                    "n/a" if peak is None else f"{peak / 1e9:.1f}",
                    f"{r['ratio']:.2f}",
                ]
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


if __name__ == "__main__":
    sys.exit(main())
