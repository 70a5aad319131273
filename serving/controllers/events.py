"""POST /v1/events: validate each event, apply consent, make the kept ones durable, answer.

Consent (spec `privacy.consent`, rules in `nextbest.ingest.consent`): the batch is judged in
order against the stored decisions, read fresh for the batch's users, so a grant
followed by events of the same user keeps those events. Consent events are appended
to the log with the rest and then recorded in the online store's consent table, both
before the 202: decisions see the new answer at once, and the logged event is the
durable record (the stream applies it again, newest wins, should the table write be
lost). So are the answers an identify event copies to its side that had none; its
link is cached until the stream has stored it.

Judging, appending and recording run under one lock (`serving.consent.ConsentGate`;
with several API processes a file lock for the home), so a batch judged while another
records a revoke cannot append that user's events after the revoke (the fresh read
runs before the lock: a read older than a cached answer never replaces it, and when
another process recorded answers since, the batch is read again under the lock).
"""

from typing import Annotated

from litestar import Controller, Response, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import Body

from nextbest.ingest.consent import DROP_REASON, Screened, screen
from nextbest.ingest.events import ACTOR_PREFIXES, Event
from nextbest.ingest.limits import Limits
from nextbest.ingest.validation import validate_batch
from serving import examples
from serving.consent import consent_gate
from serving.controllers.common import AUTH_AND_UNAVAILABLE, BODY_REFUSED, SECURITY
from serving.runtime import ServingRuntime
from serving.schemas import DroppedEvent, EventsIn, EventsOut, RejectedEvent

_PREFIXES = ", ".join(f"`{p}`" for p in ACTOR_PREFIXES)


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
            "configured limit; 400 when it nests too deep or holds too long an array "
            "(checked before decoding). Besides the spec, each event must fit the "
            "configured bounds: ts not in the future (beyond a small skew) nor before "
            "1970, bounded ids without control characters or the reserved prefixes "
            f"{_PREFIXES}, finite bounded numbers, bounded nesting. Missing "
            "event_ids are assigned and returned. When the spec "
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
            **BODY_REFUSED,
            422: ResponseSpec(
                EventsOut, description="No event was valid", examples=examples.EVENTS_NONE
            ),
        },
    )
    def ingest(
        self,
        data: Annotated[EventsIn, Body(examples=examples.EVENTS_IN)],
        runtime: ServingRuntime,
        limits: Limits,
    ) -> Response[EventsOut]:
        accepted, rejections = validate_batch(
            data.events, runtime.spec, key=runtime.pseudonymization_key, limits=limits
        )
        if runtime.consent is None or not accepted:
            screened = Screened(kept=list(enumerate(accepted)))
            _append(runtime, [e for _, e in screened.kept])
        else:
            gate = consent_gate(runtime.settings)
            seen = gate.generation()
            _prefetch(runtime, accepted)
            with gate.hold():
                if gate.generation() != seen:  # another API process recorded meanwhile
                    _prefetch(runtime, accepted)
                screened = screen(
                    accepted, runtime.spec, runtime.consent, runtime.pseudonymization_key
                )
                _append(runtime, [e for _, e in screened.kept])
                try:
                    _record_consent(runtime, screened)
                finally:
                    if screened.changes:
                        gate.recorded()
        kept = [e for _, e in screened.kept]
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


def _append(runtime: ServingRuntime, kept: list[Event]) -> None:
    if not kept:
        return
    try:
        runtime.sink.append([(e.actor, e.to_json()) for e in kept])
    except Exception as exc:
        raise ServiceUnavailableException(
            f"the event log did not accept the batch ({type(exc).__name__}); retry"
        ) from exc


def _prefetch(runtime: ServingRuntime, events: list[Event]) -> None:
    """Read the batch's consent fresh from the store (both sides of an identify)."""
    cache = runtime.consent
    assert cache is not None
    try:
        cache.prefetch_events(events, fresh=True)
    except Exception as exc:
        raise ServiceUnavailableException(
            f"consent could not be read ({type(exc).__name__}); retry"
        ) from exc


def _record_consent(runtime: ServingRuntime, screened: Screened) -> None:
    """Store the batch's decisions (and inherited answers), cache them and its links."""
    cache = runtime.consent
    if cache is None:
        return
    try:
        cache.commit(screened.changes, screened.links)
    except Exception as exc:  # the events are in the log: a retry is deduplicated
        raise ServiceUnavailableException(
            f"consent could not be recorded ({type(exc).__name__}); retry"
        ) from exc
