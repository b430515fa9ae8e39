"""Rollout decode speed: the eager decoder against the static-cache compiled one, on the same prompts and seeds.

Random-initialised models with the published Qwen2.5 architectures (bench/gpu.py's ARCHS) decode `--rows`
completions of `--new-tokens` tokens for two left-padded random prompts (half the rows each, as groups do), with
temperature-1 sampling and fixed per-row seeds, through `gspo.rollout.sample` (transformers DynamicCache, eager)
and `gspo.static_decode.sample_static` (StaticCache, one-token step compiled with CUDA graphs). The EOS is an id
the model cannot emit, so every row decodes every token. Per model it prints
  - tokens/s of each decoder (static: its second call; the first call's extra time is reported as compile time)
    and the bandwidth bound bench/gpu.py computes (weights and KV cache read once per token, measured copy rate);
  - agreement: bf16 kernels differ between the two, so a row's samples can part at some token and differ after
    it; the first such step (per row), the fraction of identical tokens and the largest log-prob difference
    before it are reported, not asserted, for static against eager and for three static calls;
  - exactness in fp32 on the first model (--check-tokens new tokens, after the timed runs): static against eager,
    and again after an in-place weight update (as an optimizer step makes), which the compiled step must see.

    PYTHONPATH=. python bench/decode_speed.py      # --models 0.5b,7b --rows 8 --prompt-len 128 --new-tokens 512
    python bench/decode_speed.py --smoke            # the tiny architecture in fp32 on the CPU, step not compiled

The last line is `ratio=<static over eager tokens/s, for the largest model that ran both>`.
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
from bench.gpu import ARCHS, build_model, ceilings, counts, decode_bound, fmt_params, sync, write_json  # noqa: E402
from gspo.rollout import sample  # noqa: E402
from gspo.static_decode import sample_static  # noqa: E402


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
    return {"first_divergence": first.tolist(), "identical_fraction": (~diff).float().mean().item(),
            "max_abs_logp_diff_before_divergence": logp.max().item() if logp.numel() else None}


def said(a: dict) -> str:
    lp = a["max_abs_logp_diff_before_divergence"]
    return (f"{a['identical_fraction']:.3f} of tokens identical, first divergence per row {a['first_divergence']} "
            f"(median {statistics.median(a['first_divergence'])}), max |log-prob diff| before it "
            f"{'n/a' if lp is None else f'{lp:.2e}'}")


def prompts(vocab: int, rows: int, width: int, device):
    """Two random prompts, the second a quarter shorter (left-padded), each continued by half the rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, width), generator=g)  # 0 is the pad id
    mask = torch.ones_like(ids)
    mask[1, :width // 4] = 0
    ids[1, :width // 4] = 0
    return ids.to(device), mask.to(device), (torch.arange(rows) * 2 // rows).to(device)


def decoders(model, args, device, T: int):
    """The two decoders on the same prompts and seeds; the EOS is past the last logit, so every row decodes T."""
    vocab = model.config.vocab_size
    ids, mask, rows = prompts(vocab, args.rows, args.prompt_len, device)
    seeds = (torch.arange(args.rows, dtype=torch.int64) + 1000).to(device)
    common = (model, ids, mask, T, {vocab}, 0, 1.0, 1.0, seeds)
    return (lambda: sample(*common, rows=rows)), (lambda: sample_static(*common, rows=rows, compile=args.compile))


def run_model(name: str, args, device, dtype, ceil: dict, log) -> dict:
    t = time.perf_counter()
    model = build_model(name, device, dtype).eval()
    c = counts(model)
    res = {"params": c["params"], "build_s": time.perf_counter() - t}
    log(f"[{name}] {fmt_params(c['params'])} params, built in {res['build_s']:.1f} s")
    T = args.new_tokens
    eager, static = decoders(model, args, device, T)
    decoders(model, args, device, 4)[0]()  # warm-up: kernels, allocator
    ref, res["eager_s"] = timed(eager, device)
    res["eager_tokens_per_s"] = args.rows * T / res["eager_s"]
    log(f"[{name}] eager: {res['eager_s']:.2f} s, {res['eager_tokens_per_s']:.0f} tokens/s")
    torch._dynamo.utils.counters.clear()
    first, first_s = timed(static, device)  # compiles, then runs the step once plainly and records its graph
    out, res["static_s"] = timed(static, device)  # graph replays only
    again = static()
    res["static_first_call_s"], res["compile_s"] = first_s, first_s - res["static_s"]
    res["static_tokens_per_s"] = args.rows * T / res["static_s"]
    res["cudagraph_skips"] = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    res["static_first_vs_second_call"] = agreement(first, out)
    res["static_second_vs_third_call"] = agreement(out, again)
    res["bound_tokens_per_s"] = decode_bound(c, args.rows, args.prompt_len, T, ceil["copy_bytes_per_s"])
    res["static_fraction_of_bound"] = res["static_tokens_per_s"] / res["bound_tokens_per_s"]
    res["eager_fraction_of_bound"] = res["eager_tokens_per_s"] / res["bound_tokens_per_s"]
    res["ratio"] = res["static_tokens_per_s"] / res["eager_tokens_per_s"]
    log(f"[{name}] static: first call {first_s:.1f} s (compile about {res['compile_s']:.1f} s), then "
        f"{res['static_s']:.2f} s, {res['static_tokens_per_s']:.0f} tokens/s = {res['ratio']:.2f}x eager; "
        f"bound {res['bound_tokens_per_s']:.0f} tokens/s (static {res['static_fraction_of_bound']:.3f}, "
        f"eager {res['eager_fraction_of_bound']:.3f}); cudagraph skips {res['cudagraph_skips']}")
    res["static_vs_eager"] = agreement(ref, out)
    log(f"[{name}] static vs eager: {said(res['static_vs_eager'])}")
    log(f"[{name}] static 1st vs 2nd call: {said(res['static_first_vs_second_call'])}")
    log(f"[{name}] static 2nd vs 3rd call: {said(res['static_second_vs_third_call'])}")
    return res


def exactness(name: str, args, device, log) -> dict:
    """In fp32 the two decoders should agree token for token, before and after an in-place weight update."""
    model = build_model(name, device, torch.float32).eval()
    T = args.check_tokens
    eager, static = decoders(model, args, device, T)
    before = static()
    res = {"tokens": T, "before_update": agreement(eager(), before)}
    log(f"[{name} fp32, {T} tokens] static vs eager: {said(res['before_update'])}")
    torch.manual_seed(0)
    with torch.no_grad():  # new values in the same tensors, as an optimizer step writes them
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    after = static()
    res["after_update"] = agreement(eager(), after)
    res["static_changed_with_weights"] = not torch.equal(before[0], after[0])
    log(f"[{name} fp32] after an in-place weight update: static vs eager: {said(res['after_update'])}; "
        f"static output changed: {res['static_changed_with_weights']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.5b,7b", help="comma-separated, of 0.5b, 1.5b, 7b")
    ap.add_argument("--rows", type=int, default=8, help="completions decoded together (two prompts, half each)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (16 with --smoke)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 (40 with --smoke)")
    ap.add_argument("--check-tokens", type=int, default=64,
                    help="new tokens of the fp32 exactness check on the first model; 0 skips it")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the static decoder's step (default: yes, no with --smoke)")
    ap.add_argument("--out", default=None, help="JSON of all numbers, rewritten after every model")
    ap.add_argument("--smoke", action="store_true", help="the tiny architecture in fp32 on the CPU, one thread")
    args = ap.parse_args(argv)
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
    data = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"models": names, "dtype": str(dtype)},
            "models": {}}
    log(f"device: {data['device']}, torch {data['torch']}, transformers {data['transformers']}; "
        f"{args.rows} rows, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, "
        f"static step {'compiled' if args.compile else 'not compiled'}")
    if args.compile:
        torch._logging.set_logs(perf_hints=True)  # says why, when torch runs a compiled step without CUDA graphs
    data["ceilings"] = ceil = ceilings(device, dtype, args.smoke)
    log(f"copy bandwidth {ceil['copy_bytes_per_s'] / 1e12:.4g} TB/s (read + written)")
    for name in names:
        t = time.perf_counter()
        try:
            data["models"][name] = run_model(name, args, device, dtype, ceil, log)
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
    ran = [r for r in data["models"].values() if "error" not in r]
    if not ran:
        print("ratio=nan", flush=True)
        return 1
    print(f"ratio={max(ran, key=lambda r: r['params'])['ratio']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
