"""Prefect tasks around the `gspo` and `rewards` library: one task per pipeline stage.

Importing this package sets offline-friendly defaults before Prefect or MLflow read their settings, so it
must come before `import prefect` (flows/__init__.py imports it first). Values already in the environment win.
"""

import logging
import os

_DEFAULTS = {
    # The temporary local server and the MLflow store live in the working directory, not in $HOME.
    "PREFECT_HOME": os.path.abspath(".gspo/prefect"),
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    # A loaded CPU machine needs more than the default 20 s to migrate and start the temporary server.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow writes "View run ... at: URL" to stdout when a run on a server ends; gspo's stdout is its summary.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # The pipeline bridges a store outage itself, within pipeline.mlflow_wait (tasks/store.py); MLflow's own
    # retries back off for minutes per request.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # transformers draws a bar for every load and save; the stages draw their own.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The library's log records go to the flow run's log (the Prefect UI) beside the stages' own. The library
    # also runs outside flow runs in the same process (tests, a notebook): no warning for those records.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "gspo,rewards",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
for _k, _v in _DEFAULTS.items():
    os.environ.setdefault(_k, _v)
# bitsandbytes warns on every import that an optional 4-bit kernel package is missing; 8-bit AdamW never uses it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# The library's INFO records (what was loaded and scored, resumes) belong in a flow run's log, unless the command
# that imports this package chose a level already (gspo -v).
for _name in ("gspo", "rewards"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)
# The temporary server cannot create its database in a directory that does not exist yet.
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
