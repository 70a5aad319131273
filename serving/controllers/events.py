"""POST /v1/events: validate each event, make the accepted ones durable, then answer."""

from typing import Annotated

from litestar import Controller, Response, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import Body

from nextbest.validation import validate_batch
from serving import examples
from serving.controllers.common import AUTH_AND_UNAVAILABLE, SECURITY
from serving.runtime import ServingRuntime
from serving.schemas import EventsIn, EventsOut, RejectedEvent


class EventsController(Controller):
    path = "/v1/events"
    tags = ["events"]
    security = SECURITY

    @post(
        "/",
        operation_id="ingestEvents",
        summary="Ingest a batch of events",
        description=(
            "Each event is validated against the spec on its own: invalid ones are "
            "returned with their index and reason, valid ones are appended to the event "
            "log (key = the event's actor). The 202 is sent only after the append is "
            "durable. 422 only when no event is valid; 413 when the body exceeds the "
            "configured limit. Missing event_ids are assigned and returned."
        ),
        status_code=202,
        sync_to_thread=True,
        opt={"scope": "ingest"},
        raises=AUTH_AND_UNAVAILABLE,
        responses={
            202: ResponseSpec(EventsOut, description="Accepted", examples=examples.EVENTS_OUT),
            413: ResponseSpec(None, description="Request body too large"),
            422: ResponseSpec(
                EventsOut, description="No event was valid", examples=examples.EVENTS_NONE
            ),
        },
    )
    def ingest(
        self,
        data: Annotated[EventsIn, Body(examples=examples.EVENTS_IN)],
        runtime: ServingRuntime,
    ) -> Response[EventsOut]:
        accepted, rejections = validate_batch(
            data.events, runtime.spec, key=runtime.pseudonymization_key
        )
        if accepted:
            try:
                runtime.sink.append([(e.actor, e.to_json()) for e in accepted])
            except Exception as exc:
                raise ServiceUnavailableException(
                    f"the event log did not accept the batch ({type(exc).__name__}); retry"
                ) from exc
        runtime.metrics.events_accepted.inc(len(accepted))
        runtime.metrics.events_rejected.inc(len(rejections))
        body = EventsOut(
            accepted=len(accepted),
            rejected=[RejectedEvent(r.index, r.reason, r.event_id) for r in rejections],
            event_ids=[e.event_id for e in accepted],
        )
        return Response(body, status_code=202 if accepted else 422)
