"""Health, readiness and Prometheus metrics (no API key: probes and scrapers)."""

from litestar import Controller, MediaType, Response, get
from litestar.openapi import ResponseSpec

from serving import examples
from serving.metrics import CONTENT_TYPE
from serving.runtime import ServingRuntime
from serving.schemas import HealthOut, ReadyOut


class OpsController(Controller):
    path = "/"
    tags = ["ops"]

    @get(
        "/health",
        operation_id="health",
        summary="Liveness: the process answers",
        responses={200: ResponseSpec(HealthOut, description="Alive", examples=examples.HEALTH_OUT)},
    )
    async def health(self) -> HealthOut:
        return HealthOut(status="ok")

    @get(
        "/ready",
        operation_id="ready",
        summary="Readiness: stores reachable, a promoted model loaded, the stream keeping up",
        description=(
            "503 with a reason per failing check otherwise. `stream` is down when events"
            " wait in the log and the stream has not moved forward for `stream_stale_s`"
            " (default 30 s); the message gives the lag in events and seconds. An idle,"
            " caught-up stream is ready."
        ),
        sync_to_thread=True,
        responses={
            200: ResponseSpec(ReadyOut, description="Ready", examples=examples.READY_OUT),
            503: ResponseSpec(ReadyOut, description="Not ready", examples=examples.READY_OUT),
        },
    )
    def ready(self, runtime: ServingRuntime) -> Response[ReadyOut]:
        health = runtime.health()
        model = runtime.assets.model
        body = ReadyOut(
            ready=health.ready,
            checks=health.checks,
            model_version=model.version if model is not None else None,
        )
        return Response(body, status_code=200 if health.ready else 503)

    @get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics (text exposition format)",
        media_type=MediaType.TEXT,
        responses={
            200: ResponseSpec(
                str,
                description="Prometheus text",
                media_type=CONTENT_TYPE,
                examples=examples.METRICS_OUT,
            )
        },
    )
    async def metrics(self, runtime: ServingRuntime) -> Response[bytes]:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)
