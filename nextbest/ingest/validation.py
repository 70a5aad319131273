"""Check raw events against the spec, one by one, with a reason for each rejection.

`accept_event` is the one ingest check: the API (each event of a batch), the importer
(each line of a file) and the stream (each record it reads: an event that bypassed the
API, from a file or a Kafka producer of the user's, goes to the dead-letter table
instead of crashing the flow) all call it, so the three write the same event for the
same input. PII properties declared in the spec are replaced by a keyed hash before any
store sees them, exactly once: a value already hashed (the API's, read again by the
stream) is left alone. With `limits` (`nextbest.ingest.limits.Limits`: the API and the
importer pass them), an event must also fit the door's bounds: ts window, id length and
characters, reserved prefixes, finite bounded numbers, bounded nesting. The stream
passes none: it reads the system's own events back (anonymized ones carry the reserved
`~nc:` prefix) and applies its own, looser bounds (`pipelines.records.unusable_event`).
"""

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from nextbest.ingest.events import Event
from nextbest.ingest.limits import LimitExceeded, Limits
from nextbest.spec.models import Spec

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "object": (dict,),
}


class EventRejected(ValueError):
    """An event that does not fit the spec; the message says why."""


@dataclass(frozen=True)
class Rejection:
    index: int
    reason: str
    event_id: str | None = None


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("int", "float") and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES[kind])


def accept_event(
    raw: Any,
    spec: Spec,
    *,
    key: bytes | None = None,
    limits: Limits | None = None,
    now: datetime | None = None,
) -> Event:
    """The one ingest check: a raw JSON object (or an `Event` a fast parser already
    built) -> the `Event` to store: fits the spec (and `limits`, when given), PII
    pseudonymized with `key` (when given, never twice), else `EventRejected`."""
    event = raw if isinstance(raw, Event) else _parse(raw)
    if limits is not None:
        check_limits(event, limits, now)
    check_event(event, spec)
    return pseudonymize(event, spec, key) if key else event


def validate_event(
    raw: Any, spec: Spec, *, limits: Limits | None = None, now: datetime | None = None
) -> Event:
    """`accept_event` without pseudonymization."""
    return accept_event(raw, spec, limits=limits, now=now)


def _parse(raw: Any) -> Event:
    if not isinstance(raw, Mapping):
        raise EventRejected("an event must be a JSON object")
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        raise EventRejected(_first_error(exc)) from None
    except RecursionError:  # nested past Python's stack: not a 500, not a crash
        raise EventRejected("properties/context: nested too deep") from None


def check_limits(event: Event, limits: Limits, now: datetime | None = None) -> None:
    """The door's bounds on a well-formed event; `EventRejected` naming the field."""
    try:
        limits.check_ts("ts", event.ts, now)
        limits.check_id("event_id", event.event_id)
        limits.check_id("user_id", event.user_id, actor=True)
        limits.check_id("anonymous_id", event.anonymous_id, actor=True)
        limits.check_id("item_id", event.item_id)
        limits.check_number("value", event.value)
        context = event.context
        for name in ("session_id", "geo", "device"):
            limits.check_id(f"context.{name}", getattr(context, name))
        limits.check_json("context", context.model_extra or {})
        limits.check_json("properties", event.properties)
    except LimitExceeded as exc:
        raise EventRejected(str(exc)) from None


def check_event(event: Event, spec: Spec) -> Event:
    """The spec's rules on an already well-formed `Event` (what `validate_event` adds
    to the model's own validation); returns it, or raises `EventRejected`."""
    declared = spec.events.get(event.type)
    if declared is None:
        known = ", ".join(sorted(spec.events))
        raise EventRejected(f"unknown event type {event.type!r}; declared types: {known}")
    if declared.identify and (event.anonymous_id is None or event.user_id is None):
        raise EventRejected(f"{event.type!r} links identities: it needs anonymous_id and user_id")
    if declared.entity == "item" and event.item_id is None:
        raise EventRejected(f"{event.type!r} events need item_id")
    if declared.value == "required" and event.value is None:
        raise EventRejected(f"{event.type!r} events need a numeric value")
    if declared.value == "none" and event.value is not None:
        raise EventRejected(f"{event.type!r} events take no value")
    for name, prop in declared.properties.items():
        if name not in event.properties:
            if prop.required:
                raise EventRejected(f"property {name!r} is required for {event.type!r}")
            continue
        value = event.properties[name]
        if value is not None and not _type_ok(prop.type, value):
            raise EventRejected(
                f"property {name!r} of {event.type!r} must be {prop.type}, "
                f"got {type(value).__name__}"
            )
    unknown = sorted(set(event.properties) - set(declared.properties))
    if unknown:
        raise EventRejected(
            f"undeclared properties {unknown} for {event.type!r}; declare them in the spec"
        )
    consent = spec.privacy.consent
    if (
        consent is not None
        and event.type == consent.event
        and not isinstance(event.properties.get(consent.property), bool)
    ):
        raise EventRejected(
            f"{event.type!r} records consent: property {consent.property!r} must be true or false"
        )
    return event


def validate_batch(
    raws: Sequence[Any],
    spec: Spec,
    *,
    key: bytes | None = None,
    limits: Limits | None = None,
    now: datetime | None = None,
) -> tuple[list[Event], list[Rejection]]:
    """Split a batch into accepted events (pseudonymized when `key` is given) and
    rejections with their index; one bad event never sinks its neighbours. `limits`
    default to `Limits()`: a batch always comes from outside."""
    limits = limits if limits is not None else Limits()
    accepted: list[Event] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for i, raw in enumerate(raws):
        try:
            event = accept_event(raw, spec, key=key, limits=limits, now=now)
        except EventRejected as exc:
            event_id = raw.get("event_id") if isinstance(raw, Mapping) else None
            if not isinstance(event_id, str) or len(event_id) > limits.max_id_length:
                event_id = None  # never echo an unbounded string back
            rejected.append(Rejection(i, str(exc), event_id))
            continue
        if event.event_id in seen:
            rejected.append(Rejection(i, "event_id repeated within the batch", event.event_id))
            continue
        seen.add(event.event_id)
        accepted.append(event)
    return accepted, rejected


def pseudonymize(event: Event, spec: Spec, key: bytes) -> Event:
    """Replace the spec's PII properties by a keyed hash (HMAC-SHA256, hex). Idempotent:
    a value that already is a keyed hash (`is_hashed`) is kept, so an event the API
    pseudonymized is not hashed again by the stream."""
    declared = spec.events.get(event.type)
    if declared is None:
        return event
    props = event.properties
    updated: dict[str, Any] | None = None
    for name, prop in declared.properties.items():
        if prop.pii and (value := props.get(name)) is not None and not is_hashed(value):
            if updated is None:
                updated = dict(props)
            updated[name] = keyed_hash(key, str(value))
    return event if updated is None else event.model_copy(update={"properties": updated})


_HASH_PREFIX = "h:"  # two characters: `is_hashed` slices at 2
_HASH_HEX = 32


def keyed_hash(key: bytes, value: str) -> str:
    return _HASH_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:_HASH_HEX]


_HASHED_LEN = len(_HASH_PREFIX) + _HASH_HEX


def is_hashed(value: Any) -> bool:
    """Whether `value` has the shape `keyed_hash` gives: 'h:' and 32 hex digits (so a
    client's clear text of that length in 'h:...' is still hashed). `bytes.fromhex` is
    the cheapest exact check: 16 bytes only from 32 hex digits without spaces."""
    if type(value) is not str or len(value) != _HASHED_LEN or value[:2] != _HASH_PREFIX:
        return False
    try:
        return len(bytes.fromhex(value[2:])) == _HASH_HEX // 2
    except ValueError:
        return False


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
