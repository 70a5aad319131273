"""The items that travel between the steps of the stream, and the parse step.

Everything here crosses worker (and process) boundaries, so it is plain, picklable
data: NamedTuples, pydantic `Event`s and the storage dataclasses. Parsing never
raises: a record the flow cannot use becomes a dead letter, so one bad producer
cannot stop the stream.
"""

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import msgspec

from nextbest.features.windows import VALUE_BOUND
from nextbest.ingest.consent import is_anonymized
from nextbest.ingest.events import ACTOR_PREFIXES, Event
from nextbest.ingest.validation import EventRejected, accept_event
from nextbest.learn.online_model import Feedback
from nextbest.spec.models import Spec
from storage.delta.schemas import DeadLetter
from storage.online.models import Alias, FeatureRow, UserState

SourceItem = tuple[int, int, str, bytes]
"""What every source emits: (partition, offset, key, payload)."""

RecordKind = Literal["event", "decision", "feedback", "dead", "erase"]
FEEDBACK_OUTCOMES = frozenset({"impression", "click", "conversion", "dismiss"})
_RECORD_FIELD = b'"record"'
_DECISION_HEAD = b'{"record":"decision",'
"""How the API's decision log starts every decision record (`serving.decisions`)."""
STORED_ID_CHARS = 256
"""Ids are VARCHAR(256) in the online store, after the stream's prefixes."""
MAX_ID_CHARS = STORED_ID_CHARS - max(len(p) for p in ACTOR_PREFIXES)
"""The longest user, anonymous or item id the stream keeps: `anon:<id>` and
`item:<id>` must still fit the online store's columns."""


class Record(NamedTuple):
    """A parsed log record with its source position (the lake sinks are keyed by it)."""

    kind: RecordKind
    partition: int
    offset: int
    body: Any  # Event | decision row dict | feedback row dict | DeadLetter


class Routed(NamedTuple):
    """An event (or a feedback record, for the online model) on its way to the
    per-user state, after identity stitching.

    `actor` is the user it now counts for; `link` marks the identify event that
    created the anonymous -> user link (the user step writes the alias for it).
    """

    actor: str
    partition: int
    offset: int
    event: Event | Feedback
    link: bool = False


class Erase(NamedTuple):
    """An erasure request from the API (`record: erase`): forget `user_id` and the
    anonymous ids linked to it in every store the stream owns."""

    user_id: str
    job_id: str
    anonymous_ids: tuple[str, ...] = ()


class Update(NamedTuple):
    """What a state step hands the sinks: absolute values, never deltas."""

    features: list[FeatureRow]
    state: UserState | None = None
    aliases: list[Alias] = []
    vector_row: dict[str, Any] | None = None  # LanceDB `users` row when a vector exists


def parse_record(
    item: SourceItem,
    spec: Spec,
    *,
    pii_key: bytes | None = None,
    max_ahead_ms: int | None = None,
) -> Record:
    """Decode one log record; never raises (anything unusable becomes a dead letter).

    With `max_ahead_ms`, an event dated more than that past the stream clock is a dead
    letter too: it would anchor its actor's and item's windows in the future (and take
    over trending) for good. Dead letters never reach bronze, so the batch side, which
    recomputes features from bronze, skips exactly the same events.
    """
    partition, offset, _key, payload = item
    event = _event_fast(payload, spec, pii_key)
    if event is not None:
        return _event_record(item, event, max_ahead_ms, pii_key)
    decision = _decision_fast(payload)
    if decision is not None:
        return Record("decision", partition, offset, decision)
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: too deep
        return _dead(item, f"undecodable payload: {type(exc).__name__}: {exc}")
    try:
        kind = raw.get("record") if isinstance(raw, dict) else None
        if kind == "decision":
            return Record("decision", partition, offset, decision_row(raw))
        if kind == "feedback":
            row = feedback_row(raw)
            for name in ("user_id", "item_id", "decision_id", "action_id"):
                _check_id(name, row[name])
            return Record("feedback", partition, offset, row)
        if kind == "erase":
            return Record("erase", partition, offset, erase_request(raw))
        return _event_record(item, accept_event(raw, spec, key=pii_key), max_ahead_ms, pii_key)
    except (EventRejected, ValueError, TypeError, KeyError) as exc:
        return _dead(item, str(exc) or type(exc).__name__)
    except Exception as exc:  # never let one record crash the flow
        return _dead(item, f"{type(exc).__name__}: {exc}")


def _event_record(
    item: SourceItem, event: Event, max_ahead_ms: int | None, pii_key: bytes | None
) -> Record:
    """The accepted event as a record, or a dead letter when the stream cannot keep it."""
    problem = unusable_event(event, max_ahead_ms) or _reserved_id(event, pii_key)
    if problem is not None:
        return _dead(item, problem)
    return Record("event", item[0], item[1], event)


def _event_fast(payload: bytes, spec: Spec, pii_key: bytes | None) -> Event | None:
    """The common case in one step: JSON bytes straight into a valid `Event` with
    pydantic's own parser (no intermediate dict; about half the cost of `json.loads`
    then `validate_event`). None sends the record down the general path, which alone
    decides other record kinds, dead letters and their messages, so the result for
    any payload is what that path alone would give."""
    if not isinstance(payload, bytes) or _RECORD_FIELD in payload:
        return None  # a decision, feedback or erase record (or an event naming one)
    try:
        return accept_event(Event.model_validate_json(payload), spec, key=pii_key)
    except Exception:
        return None


_NULL = msgspec.Raw(b"null")


class _DecisionWire(msgspec.Struct):
    """A decision record's columns; the three JSON columns stay raw JSON text."""

    record: str
    decision_id: str
    user_id: str
    ts: str | int | float
    served_from: str
    model_version: str | None = None
    actions: msgspec.Raw = _NULL
    candidates: msgspec.Raw = _NULL
    features: msgspec.Raw = _NULL


_DECISION_DECODER = msgspec.json.Decoder(_DecisionWire)


def _decision_fast(payload: bytes) -> dict[str, Any] | None:
    """A decision record as the API writes it, straight to its Delta row: the `actions`,
    `candidates` and `features` values are kept as the JSON text they already are
    (the Delta columns hold JSON text) instead of being parsed into objects and encoded
    again. That parse and encode (~5 kB a decision, a 50-item pool) were the stream's
    main cost per decision, and the nested objects made every epoch's recovery
    snapshot of the lake sink's pending rows expensive to pickle. None sends the
    record down the general path (`decision_row`), which alone words dead letters;
    anything it would read differently (a JSON string where an object is expected,
    an empty id) goes there too."""
    if not isinstance(payload, bytes) or not payload.startswith(_DECISION_HEAD):
        return None
    try:
        wire = _DECISION_DECODER.decode(payload)
        if wire.record != "decision" or not (wire.decision_id and wire.user_id):
            return None
        if not wire.served_from or wire.model_version == "" or isinstance(wire.ts, bool):
            return None
        ts = parse_ts(wire.ts)
        texts = [_raw_text(r) for r in (wire.actions, wire.candidates, wire.features)]
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, OSError):
        return None
    if any(t is False for t in texts):
        return None
    return {
        "decision_id": wire.decision_id,
        "user_id": wire.user_id,
        "ts": ts,
        "served_from": wire.served_from,
        "model_version": wire.model_version,
        "actions": texts[0],
        "candidates": texts[1],
        "features": texts[2],
    }


def _raw_text(raw: msgspec.Raw) -> str | bool | None:
    """JSON text of an object or array value, None for null; False for a string or
    number, which `storage.delta.schemas` stores differently (a string as its text)."""
    text = bytes(raw).decode()
    if text == "null":
        return None
    return text if text[:1] in ("{", "[") else False


def unusable_event(event: Event, max_ahead_ms: int | None) -> str | None:
    """Why the stream cannot keep a valid event (None when it can): an id that would not
    fit the online store or that a SQL driver refuses (NUL), a value beyond what the
    aggregates keep exact (`nextbest.features.windows.VALUE_BOUND`), or a far-future ts."""
    for name, text in (
        ("user_id", event.user_id),
        ("anonymous_id", event.anonymous_id),
        ("item_id", event.item_id),
    ):
        if text is not None and (len(text) > MAX_ID_CHARS or "\x00" in text):
            return _id_problem(name, text)
    value = event.value
    if value is not None and not -VALUE_BOUND <= value <= VALUE_BOUND:
        return f"value: {value!r} is beyond +-{VALUE_BOUND:g}"
    if max_ahead_ms is not None:
        ahead = event.ts_ms - time.time_ns() // 1_000_000
        if ahead > max_ahead_ms:
            return (
                f"ts: {event.ts.isoformat()} is {ahead // 1000} s ahead of the stream clock"
                f" (at most {max_ahead_ms // 1000} s allowed)"
            )
    return None


def _reserved_id(event: Event, pii_key: bytes | None) -> str | None:
    """A user or anonymous id that spells a system prefix (`anon:`, `item:`, `~nc:`) would
    land on a key the system owns (`item:<id>` is the item's own online row). The API
    refuses them; a producer writing past it gets a dead letter. The one exception is an
    event the API anonymized (`~nc:<keyed hash>`), which only the key can produce."""
    for name, text in (("user_id", event.user_id), ("anonymous_id", event.anonymous_id)):
        if text is not None and text.startswith(ACTOR_PREFIXES):
            if name == "anonymous_id" and pii_key is not None and is_anonymized(event, pii_key):
                continue
            return f"{name}: {text[:40]!r} starts with a prefix the system reserves"
    return None


def _check_id(name: str, value: str | None) -> None:
    if value is not None and (len(value) > MAX_ID_CHARS or "\x00" in value):
        raise ValueError(_id_problem(name, value))


def _id_problem(name: str, value: str) -> str:
    """Ids end up in VARCHAR(256) columns (prefixed) and SQL text, which refuses NUL."""
    if "\x00" in value:
        return f"{name}: contains a NUL character"
    return f"{name}: {len(value)} characters, at most {MAX_ID_CHARS} allowed"


def dead_record(
    partition: int, offset: int, raw: bytes | str | None, error: str, *, source: str
) -> Record:
    """A dead letter for a record that failed after parsing (`source` names the step)."""
    letter = DeadLetter(
        raw=raw,
        error=error[:2000],
        source=source,
        source_partition=partition,
        source_offset=offset,
    )
    return Record("dead", partition, offset, letter)


def _dead(item: SourceItem, error: str) -> Record:
    partition, offset, _key, payload = item
    letter = DeadLetter(
        raw=bytes(payload),
        error=error[:2000],
        source="stream",
        source_partition=partition,
        source_offset=offset,
    )
    return Record("dead", partition, offset, letter)


def parse_ts(value: Any) -> datetime:
    """ISO 8601 or epoch seconds -> aware UTC datetime (as `Event.ts` accepts)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"invalid ts {value!r}")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), tz=UTC)
    if not isinstance(value, str):
        raise ValueError(f"invalid ts {value!r}")
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _text(raw: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = raw.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def decision_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A decision-log record (fields of DECISIONS_SCHEMA) checked for the required keys."""
    return {
        "decision_id": _text(raw, "decision_id", required=True),
        "user_id": _text(raw, "user_id", required=True),
        "ts": parse_ts(raw.get("ts")),
        "served_from": _text(raw, "served_from", required=True),
        "model_version": _text(raw, "model_version", required=False),
        "actions": raw.get("actions"),
        "candidates": raw.get("candidates"),
        "features": raw.get("features"),
    }


def erase_request(raw: Mapping[str, Any]) -> Erase:
    anonymous = raw.get("anonymous_ids") or []
    if not isinstance(anonymous, list) or not all(isinstance(a, str) and a for a in anonymous):
        raise ValueError("anonymous_ids must be a list of non-empty strings")
    return Erase(
        user_id=_text(raw, "user_id", required=True) or "",
        job_id=_text(raw, "job_id", required=True) or "",
        anonymous_ids=tuple(anonymous),
    )


def feedback_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A feedback record: the outcome of a served decision."""
    outcome = raw.get("outcome")
    if outcome not in FEEDBACK_OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(FEEDBACK_OUTCOMES)}, got {outcome!r}")
    value = raw.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError("value must be a number")
    return {
        "decision_id": _text(raw, "decision_id", required=True),
        "user_id": _text(raw, "user_id", required=False),
        "outcome": outcome,
        "action_id": _text(raw, "action_id", required=False),
        "item_id": _text(raw, "item_id", required=False),
        "ts": parse_ts(raw.get("ts")),
        "value": None if value is None else float(value),
    }
