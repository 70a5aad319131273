"""The Litestar application: `create_app(settings)`.

The lifespan opens every store once (online store, LanceDB reader, the event-log
writer or a Kafka producer), loads the promoted model and item attributes into
memory, and runs one background task that reloads the model when the promoted
version changes and refreshes trending counts. Handlers get the runtime through a
`Provide` dependency; sync store work runs in worker threads, never on the loop.

Hardening, outermost first: metrics (bounded labels); the key check, with a limit on
failed authentications per client address (`serving.keys`); a token bucket per
*verified* API key (per client IP when keys are off) answering 429 with `Retry-After`
(`serving.ratelimit`); bodies over `settings.max_body_bytes` get 413 and bodies nested
too deep or with too long an array 400, before decoding (`serving.bodyguard`); each
value is then checked against `nextbest.ingest.limits.Limits` by the controllers. An
unhandled error is logged with a request id and answered with a generic 500 carrying
only that id, never a message or trace from the inside.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from types import EllipsisType
from typing import Any

import anyio.to_thread
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from nextbest.ingest.limits import Limits
from nextbest.logs import request_fields
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from serving.bodyguard import BodyGuardMiddleware
from serving.controllers.common import provide_runtime
from serving.controllers.decide import DecideController
from serving.controllers.docs import docs_page
from serving.controllers.events import EventsController
from serving.controllers.features import FeaturesController
from serving.controllers.feedback import FeedbackController
from serving.controllers.items import ItemsController
from serving.controllers.ops import OpsController
from serving.controllers.users import UsersController
from serving.door import known_surfaces
from serving.erasure import resume_erasures
from serving.erasure_feed import forget_announced
from serving.keys import HEADER, KeyMiddleware
from serving.metrics import Metrics, MetricsMiddleware
from serving.ratelimit import RateLimitMiddleware, buckets_for
from serving.requestlog import RequestIdMiddleware, new_request_id, response_hook
from serving.runtime import ServingRuntime, freeze_heap

log = logging.getLogger(__name__)
REFRESH_INTERVAL_S = 2.0


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="nextbest",
        version="1.0.0",
        description="Events in, next-best actions out: cached + real-time, with provenance.",
        path="/schema",
        render_plugins=[JsonRenderPlugin(), YamlRenderPlugin(), SwaggerRenderPlugin()],
        components=Components(
            security_schemes={
                "ApiKey": SecurityScheme(
                    type="apiKey",
                    name=HEADER,
                    security_scheme_in="header",
                    description="`nextbest keys create --scope ingest,decide,admin`",
                )
            }
        ),
        tags=[
            Tag(name="events", description="Ingestion"),
            Tag(name="decisions", description="Decide and feedback"),
            Tag(name="users", description="Features and erasure"),
            Tag(name="items", description="Catalogue updates and similar items"),
            Tag(name="ops", description="Health, readiness, metrics"),
        ],
    )


async def _refresh_loop(runtime: ServingRuntime, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await anyio.to_thread.run_sync(runtime.reload)
            await anyio.to_thread.run_sync(runtime.refresh_items)  # PUT /v1/items elsewhere
            await anyio.to_thread.run_sync(runtime.reload_uplift)
            await anyio.to_thread.run_sync(runtime.refresh_trending)
            await anyio.to_thread.run_sync(forget_announced, runtime)  # other workers' erasures
        except Exception:  # a failed refresh keeps the previous model; retry next tick
            log.exception("background refresh failed")


def internal_error(request: Request, exc: Exception) -> Response[dict[str, object]]:
    """500 with a request id to quote; the details go to the log only."""
    request_id = request_fields().get("request_id") or new_request_id()
    log.error(
        "unhandled error (request id %s) on %s %s",
        request_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return Response(
        {"status_code": 500, "detail": "internal server error", "request_id": request_id},
        status_code=HTTP_500_INTERNAL_SERVER_ERROR,
        headers={"X-Request-ID": request_id},
    )


def _constant(value: Limits) -> Callable[[ServingRuntime], Limits]:
    # Takes the runtime only to be resolved after it: Litestar resolves dependencies
    # that do not depend on each other as one batch in an anyio task group (two tasks
    # per request, ~10% of a decision's CPU on the event loop); a chain resolves inline.
    def provide(runtime: ServingRuntime) -> Limits:
        return value

    return provide


def create_app(
    settings: Settings,
    *,
    spec: Spec | None = None,
    require_keys: bool = True,
    refresh_interval_s: float = REFRESH_INTERVAL_S,
    rate_limit_per_s: float | EllipsisType | None = ...,
    rate_limit_burst: float | EllipsisType | None = ...,
) -> Litestar:
    """The API. `require_keys=False` turns the key guard off (local demos only).
    `rate_limit_per_s` requests per second per API key (per client IP without keys),
    bursts up to `rate_limit_burst` (default: one second's worth); None: no limit;
    both default to `settings.rate_limit_per_s` / `settings.rate_limit_burst`."""
    rate = settings.rate_limit_per_s if rate_limit_per_s is ... else rate_limit_per_s
    burst = settings.rate_limit_burst if rate_limit_burst is ... else rate_limit_burst
    limits = Limits.from_settings(settings)
    metrics = Metrics()
    run_dir, workers = settings.run_dir, settings.api_workers  # workers > 1: shared buckets
    per_min = settings.auth_failures_per_min
    failures = buckets_for(run_dir, "auth-failures", per_min / 60, per_min, workers=workers)
    middleware: list[Any] = [
        RequestIdMiddleware,  # outermost: the request id is in every line logged below
        DefineMiddleware(MetricsMiddleware, metrics=metrics),
        DefineMiddleware(KeyMiddleware, failures=failures),
    ]
    if rate is not None:
        size = burst if burst is not None else max(rate, 1.0)
        buckets = buckets_for(run_dir, "requests", rate, size, workers=workers)
        middleware.append(DefineMiddleware(RateLimitMiddleware, buckets=buckets))
    middleware.append(
        DefineMiddleware(BodyGuardMiddleware, limits=limits, max_body_bytes=settings.max_body_bytes)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        the_spec = spec if spec is not None else load_spec(settings.spec)
        runtime = await anyio.to_thread.run_sync(
            lambda: ServingRuntime.open(
                settings, the_spec, require_keys=require_keys, metrics=metrics
            )
        )
        app.state.runtime = runtime
        metrics.allow_surfaces(known_surfaces(the_spec))
        freeze_heap()
        app.state.key_verifier = runtime.keys
        # Erasure jobs a killed predecessor left unfinished (serving.erasure): in the
        # background, since finding their requests may read the whole embedded log.
        threading.Thread(
            target=resume_erasures, args=(runtime,), name="erasure-resume", daemon=True
        ).start()
        task = asyncio.create_task(_refresh_loop(runtime, refresh_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await anyio.to_thread.run_sync(runtime.close)

    return Litestar(
        route_handlers=[
            EventsController,
            DecideController,
            FeedbackController,
            UsersController,
            FeaturesController,
            ItemsController,
            OpsController,
            docs_page,
        ],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "limits": Provide(_constant(limits), sync_to_thread=False),
        },
        middleware=middleware,
        exception_handlers={HTTP_500_INTERNAL_SERVER_ERROR: internal_error},
        before_send=[response_hook(access_log=settings.access_log)],
        lifespan=[lifespan],
        openapi_config=_openapi(),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
