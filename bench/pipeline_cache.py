"""Pipeline caching: the train-eval flow on a fresh workspace, then the same config again.

Both runs use one temporary workspace (artifact root, MLflow sqlite store, PREFECT_HOME) and the temporary
local Prefect server, started before timing so neither run pays for it. The second run should find every
file stage cached, ask the registry again (registration and the promotion gate are never cached) and log
into a new MLflow run. The last line is `ratio=<cached seconds over uncached>`.

    python bench/pipeline_cache.py [--config FILE] [--set section.field=value ...]
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# The tests' small configuration: a short warm start, 3 GSPO steps, 20 arithmetic problems per evaluation.
SMALL = [
    "warm_start.steps=20",
    "warm_start.batch_size=8",
    "train.steps=3",
    "train.eval_every=3",
    "train.threads=1",
    "train.progress=false",
    "gspo.prompts_per_step=4",
    "gspo.group_size=4",
    "gspo.max_new_tokens=4",
    "data.eval_size=20",
    "eval.limit=20",
    "eval.max_new_tokens=4",
    "eval.batch_size=20",
    "optim.lr=1e-3",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML config (the defaults when omitted)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gspo-bench-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")  # before prefect is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prefect.client.orchestration import get_client

    from flows.train_eval import train_eval  # first: it sets the offline Prefect defaults

    overrides = (
        SMALL
        + [
            f"pipeline.artifact_root={work / 'artifacts'}",
            f"pipeline.mlflow_tracking_uri=sqlite:///{work / 'mlflow.db'}",
        ]
        + args.overrides
    )
    with get_client(sync_client=True) as client:
        client.hello()  # starts the temporary server outside the timed runs
    times, states = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        result = train_eval(config_path=args.config, overrides=overrides)
        times.append(time.perf_counter() - t0)
        states.append(result)
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the server's shutdown line would follow the ratio
    print(json.dumps(states[-1]))
    print(f"workspace: {work}")
    print(f"uncached: {times[0]:.1f} s")
    print(f"cached:   {times[1]:.1f} s")
    print(f"ratio={times[1] / times[0]:.3f}")


if __name__ == "__main__":
    main()
