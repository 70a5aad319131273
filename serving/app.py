"""The Litestar application: `create_app(settings)`.

The lifespan opens every store once (online store, LanceDB reader, the event-log
writer or a Kafka producer), loads the promoted model and item attributes into
memory, and runs one background task that reloads the model when the promoted
version changes and refreshes trending counts. Handlers get the runtime through a
`Provide` dependency; sync store work runs in worker threads, never on the loop.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio.to_thread
from litestar import Litestar
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag

from nextbest.settings import Settings
from nextbest.spec import Spec
from nextbest.spec_loader import load_spec
from serving.controllers.common import provide_runtime
from serving.controllers.decide import DecideController
from serving.controllers.docs import docs_page
from serving.controllers.events import EventsController
from serving.controllers.feedback import FeedbackController
from serving.controllers.ops import OpsController
from serving.controllers.users import UsersController
from serving.keys import HEADER, KeyMiddleware
from serving.metrics import Metrics, MetricsMiddleware
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
            Tag(name="ops", description="Health, readiness, metrics"),
        ],
    )


async def _refresh_loop(runtime: ServingRuntime, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await anyio.to_thread.run_sync(runtime.reload)
            await anyio.to_thread.run_sync(runtime.refresh_trending)
        except Exception:  # a failed refresh keeps the previous model; retry next tick
            log.exception("background refresh failed")


def create_app(
    settings: Settings,
    *,
    spec: Spec | None = None,
    require_keys: bool = True,
    refresh_interval_s: float = REFRESH_INTERVAL_S,
) -> Litestar:
    """The API. `require_keys=False` turns the key guard off (local demos only)."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        the_spec = spec if spec is not None else load_spec(settings.spec)
        runtime = await anyio.to_thread.run_sync(
            lambda: ServingRuntime.open(
                settings, the_spec, require_keys=require_keys, metrics=metrics
            )
        )
        app.state.runtime = runtime
        freeze_heap()
        app.state.key_verifier = runtime.keys
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
            OpsController,
            docs_page,
        ],
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False)},
        middleware=[DefineMiddleware(MetricsMiddleware, metrics=metrics), KeyMiddleware],
        lifespan=[lifespan],
        openapi_config=_openapi(),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
