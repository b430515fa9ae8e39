"""Does the demo learn on every machine? Arithmetic test accuracy before and after GSPO, over train seeds and
CPU kernel sets.

Each run is the demo's training (configs/demo.yaml, or the learning test's shortened version with --short):
the supervised warm start stopped at its held-back reward, then GSPO; the warm-started model and the
checkpoint the pipeline registers (best held-out reward) are scored on the arithmetic test problems that
neither stage trains on (the last checkpoint's score is reported too). Runs go in subprocesses, each under
ATEN_CPU_CAPABILITY=<kernels> (PyTorch then uses that kernel set, as on a CPU that only has it) with its own
TorchInductor cache (compiled code is cached per machine, not per kernel set), two at a time on one thread
each.

    .venv/bin/python bench/learning.py                       # seeds 0-4 x every kernel set this CPU offers
    .venv/bin/python bench/learning.py --short --seeds 0-4   # the learning test's configuration
    .venv/bin/python bench/learning.py --set gspo.num_minibatches=2 --out results.json

The last line is `ratio=<smallest gain / required gain>` (>= 1 when every run learns enough).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "configs" / "demo.yaml"
# The learning test (tests/test_learning.py) runs the demo shortened to this.
SHORT = ["train.steps=400"]  # the demo at half its length (the lr schedule spans the 400 steps)
# Every run, the test's too: one thread (runs go side by side), no progress lines.
RUN = ["train.progress=false", "train.threads=1"]
REQUIRED = {"demo": 0.25, "short": 0.10}


def kernel_sets() -> list[str]:
    """ATEN_CPU_CAPABILITY values this CPU can run: default always, avx2 and avx512 when its flags have them."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    out = ["default"]
    if {"avx2", "fma"} <= flags:
        out.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        out.append("avx512")
    return out


def worker(overrides: list[str], out_dir: str) -> dict:
    """One run in this process: warm start, GSPO, both scored on the test problems."""
    from gspo.config import load_config
    from gspo.data import prepare_splits
    from gspo.evaluate import evaluate_task
    from gspo.resolve import resolve_model
    from gspo.sft import warm_start
    from gspo.trainer import train

    t0 = time.perf_counter()
    cfg = load_config(DEMO, overrides)
    out = Path(out_dir)
    splits = prepare_splits(cfg)
    base = resolve_model(cfg.model, out / "base")
    ws = warm_start(cfg, base, splits.warm_start, out / "warm_start")
    res = train(cfg, ws, splits.train, splits.held_out, out / "train")
    meta = json.loads((ws / "gspo_meta.json").read_text())
    before = evaluate_task(ws, "arithmetic", cfg)
    # The checkpoint the pipeline registers: best on the held-out problems (never the test ones), else the last.
    after = evaluate_task(res.best_dir or res.final_dir, "arithmetic", cfg)["score"]
    final = evaluate_task(res.final_dir, "arithmetic", cfg)["score"]
    return {
        "before": before["score"],
        "after": after,
        "gain": after - before["score"],
        "final": final,
        "n": before["n"],
        "warm_start_steps": meta["warm_start_steps"],
        "warm_start_reward": meta["warm_start_reward"],
        "seconds": time.perf_counter() - t0,
        # What the run's process costs (imports included) on an otherwise idle core: wall time depends on what
        # else the machine runs.
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
    }


def run_one(kernels: str, seed: int, overrides: list[str], tmp: Path) -> dict:
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY=kernels,
        TORCHINDUCTOR_CACHE_DIR=str(tmp / f"inductor-{kernels}"),
        PYTHONPATH=str(ROOT),
    )
    out = tmp / f"{kernels}-{seed}"
    args = [
        sys.executable,
        __file__,
        "--worker",
        str(out),
        "--",
        *overrides,
        f"train.seed={seed}",
        *RUN,
    ]
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"kernels": kernels, "seed": seed, "error": p.stderr.strip().splitlines()[-1] if p.stderr else "failed"}
    return {"kernels": kernels, "seed": seed, **json.loads(p.stdout.strip().splitlines()[-1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-4", help="train seeds, e.g. 0-4 or 0,3")
    ap.add_argument(
        "--kernels", default=None, help="comma-separated ATEN_CPU_CAPABILITY values (default: all this CPU has)"
    )
    ap.add_argument("--short", action="store_true", help="the learning test's shortened demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--out", default=None, help="JSON of every run")
    ap.add_argument("--keep", default=None, help="keep every run's directory (models, metrics) under this one")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.rest, a.worker)))
        return 0
    lo, _, hi = a.seeds.partition("-")
    seeds = list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in a.seeds.split(",")]
    kernels = a.kernels.split(",") if a.kernels else kernel_sets()
    overrides = (SHORT if a.short else []) + a.overrides
    required = REQUIRED["short" if a.short else "demo"]
    print(
        f"config: {DEMO.name} {' '.join(overrides)}; seeds {seeds}; kernels {kernels}; need +{required:.2f}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="gspo-learning-") as tmp, ThreadPoolExecutor(a.parallel) as pool:
        root = Path(a.keep or tmp)
        jobs = [(k, s) for s in seeds for k in kernels]
        runs = list(pool.map(lambda ks: run_one(ks[0], ks[1], overrides, root), jobs))
    print("| kernels | seed | warm-start steps | before | after | gain | last checkpoint | CPU minutes | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['kernels']} | {r['seed']} | error: {r['error']} |")
            continue
        print(
            f"| {r['kernels']} | {r['seed']} | {r['warm_start_steps']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['gain']:+.3f} | {r['final']:.3f} | {r['cpu_seconds'] / 60:.1f} | {r['seconds'] / 60:.1f} |"
        )
    ok = [r for r in runs if "error" not in r]
    if a.out:
        Path(a.out).write_text(json.dumps({"config": str(DEMO), "overrides": overrides, "runs": runs}, indent=1))
    if len(ok) < len(runs):
        print("ratio=nan")
        return 1
    gains = [r["gain"] for r in ok]
    cpu, wall = max(r["cpu_seconds"] for r in ok) / 60, max(r["seconds"] for r in ok) / 60
    print(f"gain min {min(gains):+.3f}, max {max(gains):+.3f}; longest run {cpu:.1f} CPU min ({wall:.1f} min wall)")
    print(f"ratio={min(gains) / required:.3f}")
    return 0 if min(gains) >= required else 1


if __name__ == "__main__":
    sys.exit(main())
