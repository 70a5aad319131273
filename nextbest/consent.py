"""Consent per user (spec `privacy.consent`): the rules the API and the stream share.

A consent event (`privacy.consent.event`, user-level, with a boolean property) records
whether its subject consents. The subject is the event's actor: the user id, else
`anon:<anonymous_id>` (a visitor can answer a cookie banner before logging in). The
newest decision by event time wins; a subject that never decided gets
`privacy.consent.default`. An anonymous visitor linked to a user (identify) follows the
user's decision when the user made one.

For an event whose subject does not consent, `without_consent` decides:
- `drop`: the event is stored nowhere;
- `aggregate`: an item event is stored with the person removed (`anonymize`): no user
  or anonymous id, its id replaced by a keyed hash, PII properties and the session
  removed, so item popularity and trending still learn while no per-user state can be
  built. Events without an item carry nothing to aggregate and are dropped.
Consent events themselves are always kept: they are the record of the choice (they
carry the user id and go when the user is erased).

Events judged at ingest are marked in their context (`MARK`), so the stream, which
re-applies these rules to what producers wrote straight to Kafka, never second-guesses
the API's answer for an event it acknowledged. Pure: the stored decisions come in
through `ConsentState` (see `storage.online_consent`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from nextbest.events import Event, EventContext
from nextbest.spec import Consent, Spec
from nextbest.validation import keyed_hash

NO_CONSENT_PREFIX = "~nc:"
"""`anonymous_id` prefix of an anonymized (aggregate-only) event."""
MARK = "nb_consent"
"""Context key the API sets on events it judged: `granted` or `aggregated`."""
DROP_REASON = "no consent"
Verdict = Literal["keep", "record", "aggregate", "drop"]


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """A subject's consent decision as of `ts_ms` (event time of the consent event)."""

    subject: str
    granted: bool
    ts_ms: int


def newest(a: ConsentChange | None, b: ConsentChange | None) -> ConsentChange | None:
    """The decision in force: the later by event time (`b` on a tie: it came later)."""
    if a is None or b is None:
        return b if a is None else a
    return b if b.ts_ms >= a.ts_ms else a


class ConsentState(Protocol):
    """Stored decisions and identity links (the online store, behind a cache)."""

    def stored(self, subject: str) -> ConsentChange | None: ...

    def linked_user(self, anonymous_id: str) -> str | None: ...


class ScreenState(ConsentState, Protocol):
    """A state that also learns from the events it judges."""

    def apply(self, change: ConsentChange) -> None: ...

    def link(self, anonymous_id: str, user_id: str) -> None: ...


def change_of(event: Event, consent: Consent) -> ConsentChange | None:
    """The decision a consent event records (None for any other event)."""
    if event.type != consent.event:
        return None
    value = event.properties.get(consent.property)
    return ConsentChange(event.actor, value is True, event.ts_ms)


def is_anonymized(event: Event) -> bool:
    return event.user_id is None and (event.anonymous_id or "").startswith(NO_CONSENT_PREFIX)


def allowed(state: ConsentState, actor: str, consent: Consent) -> bool:
    """Whether `actor` (a user id or `anon:<id>`) consents now."""
    if actor.startswith("anon:"):
        user = state.linked_user(actor[5:])
        if user is not None:
            row = state.stored(user)
            if row is not None:
                return row.granted
    row = state.stored(actor)
    return row.granted if row is not None else consent.default == "granted"


def anonymize(event: Event, spec: Spec, key: bytes) -> Event:
    """The event without its person: what `aggregate` keeps. Deterministic (a keyed
    hash of the event id), so a retried or replayed event is still deduplicated."""
    declared = spec.events.get(event.type)
    pii = {n for n, p in declared.properties.items() if p.pii} if declared else set()
    event_id = keyed_hash(key, f"consent:{event.event_id}")
    props = {k: (None if k in pii else v) for k, v in event.properties.items()}
    context = EventContext.model_validate(
        {"geo": event.context.geo, "device": event.context.device, MARK: "aggregated"}
    )
    return event.model_copy(
        update={
            "event_id": event_id,
            "user_id": None,
            "anonymous_id": NO_CONSENT_PREFIX + event_id.removeprefix("h:"),
            "context": context,
            "properties": props,
        }
    )


def mark(event: Event) -> Event:
    """Note in the context that consent was checked (and granted) at ingest."""
    extra = event.context.model_dump(exclude_none=True)
    extra[MARK] = "granted"
    return event.model_copy(update={"context": EventContext.model_validate(extra)})


def judged(event: Event) -> bool:
    """Already judged upstream: marked by the API, or anonymized."""
    return is_anonymized(event) or (event.context.model_extra or {}).get(MARK) is not None


class Overlay:
    """A `ConsentState` plus the decisions and links of events screened so far, so a
    batch is judged in order (a grant followed by events of the same user)."""

    def __init__(self, base: ConsentState) -> None:
        self.base = base
        self.changes: dict[str, ConsentChange] = {}
        self.links: dict[str, str] = {}

    def stored(self, subject: str) -> ConsentChange | None:
        return newest(self.base.stored(subject), self.changes.get(subject))

    def linked_user(self, anonymous_id: str) -> str | None:
        return self.links.get(anonymous_id) or self.base.linked_user(anonymous_id)

    def apply(self, change: ConsentChange) -> None:
        current = self.changes.get(change.subject)
        self.changes[change.subject] = newest(current, change) or change

    def link(self, anonymous_id: str, user_id: str) -> None:
        self.links[anonymous_id] = user_id


def verdict(event: Event, spec: Spec, consent: Consent, state: ScreenState) -> Verdict:
    """Judge one event against `state`, updating it (consent events, identify links)."""
    change = change_of(event, consent)
    if change is not None:
        state.apply(change)
        return "record"
    if is_anonymized(event):
        return "keep"
    if allowed(state, event.actor, consent):
        anonymous, user = event.anonymous_id, event.user_id
        if anonymous is not None and user is not None and event.type in spec.identify_events():
            state.link(anonymous, user)
        return "keep"
    if consent.without_consent == "aggregate" and event.item_id is not None:
        return "aggregate"
    return "drop"


@dataclass
class Screened:
    """A batch after consent: what to store (with input indices), what not."""

    kept: list[tuple[int, Event]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    aggregated: list[int] = field(default_factory=list)
    changes: list[ConsentChange] = field(default_factory=list)


def screen(events: Sequence[Event], spec: Spec, state: ConsentState, key: bytes) -> Screened:
    """Judge a batch in order; kept events are marked (`MARK`) for the stream."""
    consent = spec.privacy.consent
    out = Screened()
    if consent is None:
        out.kept = list(enumerate(events))
        return out
    overlay = Overlay(state)
    for i, event in enumerate(events):
        v = verdict(event, spec, consent, overlay)
        if v == "record":
            change = change_of(event, consent)
            assert change is not None
            out.changes.append(change)
            out.kept.append((i, event))
        elif v == "keep":
            out.kept.append((i, event if is_anonymized(event) else mark(event)))
        elif v == "aggregate":
            out.aggregated.append(i)
            out.kept.append((i, anonymize(event, spec, key)))
        else:
            out.dropped.append(i)
    return out
