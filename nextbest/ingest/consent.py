"""Consent per user (spec `privacy.consent`): the rules the API and the stream share.

A consent event (`privacy.consent.event`, user-level, with a boolean property) records
whether its subject consents. The subject is the event's actor: the user id, else
`anon:<anonymous_id>` (a visitor can answer a cookie banner before logging in). The
newest decision by event time wins; a subject that never decided gets
`privacy.consent.default`. An anonymous visitor linked to a user (identify) follows the
user's decision when the user made one.

An identify event says two ids are one person. It is judged by the user's answer, else
the visitor's own, else the default; when it links the visitor (the first link: the
stream's stitch step keeps that one, so later links are not followed here either), the
side that never answered takes the other's answer (`inherited`), so a visitor who
granted consent before logging in is not dropped as a user without an answer, and a
visitor keeps the user's answer after the batch whose identify linked them.

For an event whose subject does not consent, `without_consent` decides:
- `drop`: the event is stored nowhere;
- `aggregate`: an item event is stored with the person removed (`anonymize`): no user
  or anonymous id, its id replaced by a keyed hash, PII properties and the session
  removed, so item popularity and trending still learn while no per-user state can be
  built. Events without an item carry nothing to aggregate and are dropped.
Consent events themselves are always kept: they are the record of the choice (they
carry the user id and go when the user is erased).

Events judged at ingest are marked in their context (`MARK`: the verdict and a keyed
hash of the event id), and an anonymized event's `anonymous_id` is a keyed hash of its
id, so the stream, which re-applies these rules to what producers wrote straight to
Kafka, never second-guesses the API's answer for an event it acknowledged, while a
producer cannot forge either (without the pseudonymization key). Pure: the stored
decisions come in through `ConsentState` (see `storage.online.consent`).
"""

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from nextbest.ingest.events import (
    NO_CONSENT_PREFIX as NO_CONSENT_PREFIX,  # re-exported: the anonymized events' prefix
)
from nextbest.ingest.events import Event, EventContext, anon_actor, anonymous_of
from nextbest.ingest.validation import keyed_hash
from nextbest.spec.models import Consent, Spec

MARK = "nb_consent"
"""Context key the API sets on events it judged: `granted:<tag>` or `aggregated:<tag>`."""
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


def prefetch_keys(events: Iterable[Event]) -> tuple[list[str], list[str]]:
    """(subjects, anonymous ids) whose stored answers and links judging `events` reads:
    each actor, both sides of an event with two ids (an identify), every visitor."""
    subjects: list[str] = []
    anonymous: list[str] = []
    for e in events:
        subjects.append(e.actor)
        if e.anonymous_id:
            anonymous.append(e.anonymous_id)
            if e.user_id:
                subjects.append(anon_actor(e.anonymous_id))
    return subjects, anonymous


def _tag(key: bytes, kind: str, event_id: str) -> str:
    return keyed_hash(key, f"{MARK}:{kind}:{event_id}").removeprefix("h:")


def is_anonymized(event: Event, key: bytes) -> bool:
    """Anonymized by `anonymize` with this key (a client-chosen `~nc:` id is not)."""
    anonymous = event.anonymous_id
    if event.user_id is not None or anonymous is None:
        return False
    if not anonymous.startswith(NO_CONSENT_PREFIX):
        return False
    expected = NO_CONSENT_PREFIX + _tag(key, "aggregated", event.event_id)
    return hmac.compare_digest(anonymous, expected)


def allowed(state: ConsentState, actor: str, consent: Consent) -> bool:
    """Whether `actor` (a user id or `anon:<id>`) consents now."""
    anonymous = anonymous_of(actor)
    if anonymous is not None:
        user = state.linked_user(anonymous)
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
    tag = _tag(key, "aggregated", event_id)
    props = {k: (None if k in pii else v) for k, v in event.properties.items()}
    context = EventContext.model_validate(
        {"geo": event.context.geo, "device": event.context.device, MARK: f"aggregated:{tag}"}
    )
    return event.model_copy(
        update={
            "event_id": event_id,
            "user_id": None,
            "anonymous_id": NO_CONSENT_PREFIX + tag,
            "context": context,
            "properties": props,
        }
    )


def mark(event: Event, key: bytes) -> Event:
    """Note in the context that consent was checked (and granted) at ingest, with a
    keyed hash of the event id so that a producer cannot set the mark itself."""
    extra = event.context.model_dump(exclude_none=True)
    extra[MARK] = f"granted:{_tag(key, 'granted', event.event_id)}"
    return event.model_copy(update={"context": EventContext.model_validate(extra)})


def judged(event: Event, key: bytes) -> bool:
    """Already judged upstream: validly marked by the API, or anonymized."""
    if is_anonymized(event, key):
        return True
    value = (event.context.model_extra or {}).get(MARK)
    if not isinstance(value, str):
        return False
    return hmac.compare_digest(value, f"granted:{_tag(key, 'granted', event.event_id)}")


class Overlay:
    """A `ConsentState` plus the decisions and links of events screened so far, so a
    batch is judged in order (a grant followed by events of the same user).
    `recorded` lists every decision applied, in order: what must be stored."""

    def __init__(self, base: ConsentState) -> None:
        self.base = base
        self.changes: dict[str, ConsentChange] = {}
        self.links: dict[str, str] = {}
        self.recorded: list[ConsentChange] = []

    def stored(self, subject: str) -> ConsentChange | None:
        return newest(self.base.stored(subject), self.changes.get(subject))

    def linked_user(self, anonymous_id: str) -> str | None:
        # The first link wins, as in the stream's stitch step (`pipelines.flow.stitch`).
        return self.base.linked_user(anonymous_id) or self.links.get(anonymous_id)

    def apply(self, change: ConsentChange) -> None:
        current = self.changes.get(change.subject)
        self.changes[change.subject] = newest(current, change) or change
        self.recorded.append(change)

    def link(self, anonymous_id: str, user_id: str) -> None:
        if self.base.linked_user(anonymous_id) is None:
            self.links.setdefault(anonymous_id, user_id)


def inherited(
    state: ConsentState, anonymous_id: str, user_id: str
) -> tuple[ConsentChange | None, ConsentChange | None]:
    """For an identify event: (the answer it is judged by, the copy the side without an
    answer takes). Nothing is copied when the visitor is already linked to another
    user: the stream keeps that first link, so the visitor follows that user."""
    anon = anon_actor(anonymous_id)
    user_row, anon_row = state.stored(user_id), state.stored(anon)
    if user_row is not None:
        answer, copy = user_row, None if anon_row else ConsentChange(anon, *_of(user_row))
    elif anon_row is not None:
        answer, copy = anon_row, ConsentChange(user_id, *_of(anon_row))
    else:
        return None, None
    if state.linked_user(anonymous_id) not in (None, user_id):
        copy = None
    return answer, copy


def _of(row: ConsentChange) -> tuple[bool, int]:
    return row.granted, row.ts_ms


def verdict(event: Event, spec: Spec, consent: Consent, state: ScreenState, key: bytes) -> Verdict:
    """Judge one event against `state`, updating it (consent events, identify links and
    the answers an identify copies)."""
    change = change_of(event, consent)
    if change is not None:
        state.apply(change)
        return "record"
    if is_anonymized(event, key):
        return "keep"
    anonymous, user = event.anonymous_id, event.user_id
    if anonymous is not None and user is not None and event.type in spec.identify_events():
        answer, copy = inherited(state, anonymous, user)
        if copy is not None:
            state.apply(copy)
        ok = answer.granted if answer is not None else consent.default == "granted"
        if ok:
            state.link(anonymous, user)
    else:
        ok = allowed(state, event.actor, consent)
    if ok:
        return "keep"
    if consent.without_consent == "aggregate" and event.item_id is not None:
        return "aggregate"
    return "drop"


@dataclass
class Screened:
    """A batch after consent: what to store (with input indices), what not, the
    decisions to record and the identity links its kept identify events made."""

    kept: list[tuple[int, Event]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    aggregated: list[int] = field(default_factory=list)
    changes: list[ConsentChange] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)


def screen(events: Sequence[Event], spec: Spec, state: ConsentState, key: bytes) -> Screened:
    """Judge a batch in order; kept events are marked (`MARK`) for the stream."""
    consent = spec.privacy.consent
    out = Screened()
    if consent is None:
        out.kept = list(enumerate(events))
        return out
    overlay = Overlay(state)
    for i, event in enumerate(events):
        v = verdict(event, spec, consent, overlay, key)
        if v == "record":
            out.kept.append((i, event))
        elif v == "keep":
            out.kept.append((i, event if is_anonymized(event, key) else mark(event, key)))
        elif v == "aggregate":
            out.aggregated.append(i)
            out.kept.append((i, anonymize(event, spec, key)))
        else:
            out.dropped.append(i)
    out.changes = overlay.recorded
    out.links = overlay.links
    return out
