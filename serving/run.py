"""`run_api(settings)`: the API under uvicorn, for `nextbest api` / `nextbest up`.

The default pseudonymization key is a public constant: anyone could reverse the hashed
PII of a server using it. So the API refuses to listen on a non-loopback address with
it, and warns on loopback.

Several processes (`settings.api_workers` > 1, `nextbest api --workers N`): uvicorn's
supervisor binds the port once and runs N worker processes that accept on it (and
restarts one that dies); each runs the app's lifespan, so each opens its own store
clients and loads the promoted model. What they must agree on is shared, never kept
per process:

- event log: every worker is a *shared writer* of the embedded log
  (`storage.eventlog.shared`): keyed routing and per-partition order are those of one
  process; with Kafka they produce to the same topic.
- rate limits and the failed-authentication limit: one token-bucket table mapped from
  `<home>/run/` (`serving.ratelimit.SharedTokenBuckets`): the configured rate is the
  rate of the whole API, whichever worker a request lands on.
- key revocation: in the online store; `nextbest keys revoke` also bumps
  `<home>/run/keys.epoch`, which drops every worker's key cache at its next request.
- consent: judging + append + record run under one file lock (`serving.consent`);
  decisions drop their cached answers when any worker recorded one.
- model promotion: `nb_models` in the online store, polled by every worker's refresh
  loop (`REFRESH_INTERVAL_S`).
- erasure jobs: `nb_erasure_jobs` in the online store; a job's hand-over runs in the
  worker that took the DELETE under `<home>/run/erasure/<job>.lock`, so a restarted
  worker resumes only jobs nobody is running (`serving.erasure`); the other workers
  drop the person from memory through `<home>/run/erasures.feed` (`serving.erasure_feed`).
- metrics: prometheus_client's multiprocess mode (`<home>/run/metrics/`), so /metrics
  answers for the whole API whichever worker serves it (gauges carry a `pid` label).

All of this is per data home on one machine; processes on other machines need Kafka
and their own home (docs/scale-out.md).
"""

import ipaddress
import logging
import os
import shutil
from typing import Any

import uvicorn

from nextbest.logs import configure_logging
from nextbest.settings import KEY_FILE, Settings
from serving.app import create_app
from serving.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)
PID_HEADER = "X-Nextbest-Worker"
"""Response header naming the pid of the worker process that answered."""
_REQUIRE_KEYS_ENV = "NEXTBEST_API_REQUIRE_KEYS"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def check_exposure(settings: Settings) -> None:
    """SystemExit when a non-loopback API would use the public development key."""
    if not settings.default_pseudonymization_key:
        return
    where = settings.home_dir / KEY_FILE
    how = (
        "set NEXTBEST_PSEUDONYMIZATION_KEY to a long random secret (e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or write one to "
        f"{where} (`nextbest init` does); keep it: changing it changes every hashed value"
    )
    if not is_loopback(settings.api_host):
        raise SystemExit(
            f"refusing to serve on {settings.api_host!r} with the default development "
            f"pseudonymization key, which is public: {how}"
        )
    log.warning("the API uses the default development pseudonymization key: %s", how)


class WorkerHeader:
    """Names the answering process in `X-Nextbest-Worker` (which worker took a request
    is the kernel's choice; operators and tests see it here)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_pid(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((PID_HEADER.lower().encode(), self.pid))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_pid)


def worker_app() -> WorkerHeader:
    """The app of one worker process (uvicorn's factory): settings from the environment
    `run_api` prepared."""
    require_keys = os.environ.get(_REQUIRE_KEYS_ENV, "1") != "0"
    settings = Settings()
    configure_logging(settings, "api")
    return WorkerHeader(create_app(settings, require_keys=require_keys))


def worker_environment(settings: Settings, *, require_keys: bool) -> dict[str, str]:
    """What a worker needs to rebuild these settings: the command line's overrides."""
    return {
        "NEXTBEST_HOME": str(settings.home_dir),
        "NEXTBEST_SPEC": str(settings.spec.resolve()),
        "NEXTBEST_API_WORKERS": str(settings.api_workers),
        _REQUIRE_KEYS_ENV: "1" if require_keys else "0",
    }


def run_api(settings: Settings, *, require_keys: bool = True, log_level: str | None = None) -> None:
    """Serve on `settings.api_host:settings.api_port` until interrupted, in one process
    or in `settings.api_workers` processes sharing the port."""
    configure_logging(settings, "api")
    check_exposure(settings)
    common: dict[str, Any] = {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_level": log_level or settings.log_level.lower(),
        "access_log": False,  # ours, opt-in: NEXTBEST_ACCESS_LOG (serving.requestlog)
        "log_config": None,  # uvicorn's loggers propagate to our renderer (nextbest.logs)
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
    }
    if settings.api_workers == 1:
        uvicorn.run(WorkerHeader(create_app(settings, require_keys=require_keys)), **common)
        return
    metrics = settings.run_dir / "metrics"  # this run's samples only
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(parents=True)
    os.environ.update(worker_environment(settings, require_keys=require_keys))
    os.environ[MULTIPROC_ENV] = str(metrics)  # read by prometheus_client in the workers
    # Workers are spawned processes: they import this module and call the factory.
    uvicorn.run(
        "serving.run:worker_app",
        factory=True,
        workers=settings.api_workers,
        **common,
    )
