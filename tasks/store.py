"""The MLflow store as the pipeline uses it: one client per tracking URI that waits out a store that does not
answer, for a bounded time, and a sqlite store created and migrated by one process at a time.

MLflow's own HTTP retries are off (tasks/__init__.py sets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0): they back off
for about 4 minutes per request, so a run against a dead server took over 20 minutes to fail. Here every
call retries while the store is unreachable, and all calls share one deadline per outage: `wait` seconds
after the first failed call, every call fails at once with the URI and what to do. A shorter outage (a
server restart) is bridged and the run goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import time
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
_down_since: dict[str, float] = {}  # tracking URI -> when the current outage was first seen


class StoreUnavailable(RuntimeError):
    pass


def tracking_uri(uri: str) -> str:
    """A relative sqlite URI made absolute, so every process and cache key means the same database."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path(uri[len(SQLITE) :]).resolve())
    return uri


def _unreachable(e: BaseException) -> bool:
    """A failure that says nothing about the request, only that the store did not take it: no connection
    (refused, reset, DNS), a gateway with no server behind it, or a sqlite file another process holds."""
    chain = [e]
    while len(chain) < 10 and (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(cause)
    return any(
        isinstance(x, requests.exceptions.ConnectionError)
        or "database is locked" in str(x)
        or (isinstance(x, MlflowException) and x.get_http_status_code() in (502, 503, 504))
        for x in chain
    )


def lost_a_race(e: Exception) -> bool:
    """Another run created the same row first (two runs of one config at once): experiment, registered model,
    dataset. MLflow's get-or-create is not atomic; looking again finds the other run's row."""
    return isinstance(e, MlflowException) and (
        e.error_code == "RESOURCE_ALREADY_EXISTS" or "unique constraint" in str(e).lower()
    )


def patiently(uri: str, wait: float, fn, *args, **kwargs) -> Any:
    """fn(*args, **kwargs), retried while the store at `uri` is unreachable and the outage is younger than
    `wait` seconds."""
    delay = 0.5
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not _unreachable(e):
                raise
            now = time.monotonic()
            since = _down_since.setdefault(uri, now)
            if now - since >= wait:
                raise StoreUnavailable(
                    f"MLflow tracking store {uri} did not answer for {now - since:.0f} s "
                    f"(pipeline.mlflow_wait={wait:g}): start it or set pipeline.mlflow_tracking_uri to one that "
                    f"runs, then retry; finished stages come back cached ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]})"
                ) from e
            if since == now:
                log.warning("MLflow tracking store %s does not answer; waiting up to %g s for it", uri, wait)
            time.sleep(min(delay, since + wait - now))
            delay = min(2 * delay, 5.0)
            continue
        if _down_since.pop(uri, None) is not None:
            log.warning("MLflow tracking store %s answers again", uri)
        return result


def _upsert(fn, *args, **kwargs) -> Any:
    """fn, a set_* call (tag, alias), done again when it lost a race: MLflow's sqlite store writes one as
    select-then-insert, so two runs setting the same key at once make the second insert fail on the unique key,
    although the row it meant to write now exists; done again, the select finds it and updates it."""
    for attempt in range(3):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == 2 or not lost_a_race(e):
                raise
            log.info("%s lost a race with another writer of the same key; setting it again", fn.__name__)


class Client:
    """An MlflowClient whose every call goes through `patiently`, and every set_* call through `_upsert`."""

    def __init__(self, uri: str, wait: float):
        self.uri, self.wait = uri, wait
        self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        if name.startswith("set_"):
            return lambda *args, **kwargs: patiently(self.uri, self.wait, _upsert, attr, *args, **kwargs)
        return lambda *args, **kwargs: patiently(self.uri, self.wait, attr, *args, **kwargs)


@contextlib.contextmanager
def locked(uri: str):
    """Held while a sqlite store is created: two first runs in an empty directory otherwise both run MLflow's
    schema migration on one file, and one of them fails."""
    if not uri.startswith(SQLITE):
        yield
        return
    db = Path(uri[len(SQLITE) :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield


@functools.cache
def client(uri: str, wait: float) -> Client:
    """The client of a tracking URI (absolute: see tracking_uri), its store created if it is new."""
    uri = tracking_uri(uri)
    with locked(uri):  # MLflow creates and migrates a new sqlite file's tables in the client and its first calls
        c = Client(uri, wait)
        c.search_experiments(max_results=1)
        c.search_registered_models(max_results=1)
    return c
