"""POST /v1/events: validate each event, apply consent, make the kept ones durable, answer.

Consent (spec `privacy.consent`, rules in `nextbest.consent`): the batch is judged in
order against the stored decisions, read fresh for the batch's users, so a grant
followed by events of the same user keeps those events. Consent events are appended
to the log with the rest and then recorded in the online store's consent table, both
before the 202: decisions see the new answer at once, and the logged event is the
durable record (the stream applies it again, newest wins, should the table write be
lost).
"""

from typing import Annotated

from litestar import Controller, Response, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import Body

from nextbest.consent import DROP_REASON, Screened, screen
from nextbest.events import Event
from nextbest.validation import validate_batch
from serving import examples
from serving.controllers.common import AUTH_AND_UNAVAILABLE, SECURITY
from serving.runtime import ServingRuntime
from serving.schemas import DroppedEvent, EventsIn, EventsOut, RejectedEvent


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
            "configured limit. Missing event_ids are assigned and returned. When the spec "
            "declares consent (privacy.consent), events of users without consent are "
            "listed under `dropped` (not stored) or stored without the person "
            "(`aggregated`, counted in `accepted`)."
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
        screened = _screen(runtime, accepted)
        kept = [e for _, e in screened.kept]
        if kept:
            try:
                runtime.sink.append([(e.actor, e.to_json()) for e in kept])
            except Exception as exc:
                raise ServiceUnavailableException(
                    f"the event log did not accept the batch ({type(exc).__name__}); retry"
                ) from exc
        _record_consent(runtime, screened)
        runtime.metrics.events_accepted.inc(len(kept))
        runtime.metrics.events_rejected.inc(len(rejections))
        # Indices into `accepted` -> indices into the request (validate_batch keeps order).
        rejected = {r.index for r in rejections}
        valid = [i for i in range(len(data.events)) if i not in rejected]
        body = EventsOut(
            accepted=len(kept),
            rejected=[RejectedEvent(r.index, r.reason, r.event_id) for r in rejections],
            event_ids=[accepted[j].event_id for j, _ in screened.kept],
            dropped=[
                DroppedEvent(valid[j], DROP_REASON, accepted[j].event_id) for j in screened.dropped
            ],
            aggregated=len(screened.aggregated),
        )
        return Response(body, status_code=202 if kept or screened.dropped else 422)


def _screen(runtime: ServingRuntime, events: list[Event]) -> Screened:
    """Judge the batch against consent read fresh from the store (no-op without it)."""
    cache = runtime.consent
    if cache is None or not events:
        return Screened(kept=list(enumerate(events)))
    anonymous = [e.anonymous_id for e in events if e.user_id is None and e.anonymous_id]
    try:
        cache.prefetch([e.actor for e in events], anonymous, fresh=True)
    except Exception as exc:
        raise ServiceUnavailableException(
            f"consent could not be read ({type(exc).__name__}); retry"
        ) from exc
    return screen(events, runtime.spec, cache, runtime.pseudonymization_key)


def _record_consent(runtime: ServingRuntime, screened: Screened) -> None:
    cache = runtime.consent
    if cache is None or not screened.changes:
        return
    try:
        cache.store.record(screened.changes)
    except Exception as exc:  # the events are in the log: a retry is deduplicated
        raise ServiceUnavailableException(
            f"consent could not be recorded ({type(exc).__name__}); retry"
        ) from exc
    for change in screened.changes:
        cache.apply(change)
