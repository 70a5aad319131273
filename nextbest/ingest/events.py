"""The event record shared by the API, the event log, the stream and the batch.

The wire shape: docs/architecture.md#the-event-record. `ts` accepts ISO 8601 or epoch seconds and
is normalised to an aware UTC datetime; a missing `event_id` is assigned so that
downstream sinks can deduplicate on it.
"""

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ANON_PREFIX = "anon:"
"""Key prefix of an anonymous visitor (`anon_actor`): events, consent, the online store."""
ITEM_PREFIX = "item:"
"""Key prefix of an item entity's window features in the online store (`item_actor`)."""
NO_CONSENT_PREFIX = "~nc:"
"""Ids the system makes for what is stored without its person (`nextbest.ingest.consent`
anonymized events, `serving.consent.unlogged_actor` decisions)."""
ACTOR_PREFIXES = (ANON_PREFIX, ITEM_PREFIX, NO_CONSENT_PREFIX)
"""Every prefix the system writes in front of ids to key its stores: a client id starting
with one would collide with the system's own keys (erasing `item:X` would wipe an item)."""


def anon_actor(anonymous_id: str) -> str:
    """The actor key of an anonymous visitor (what `Event.actor` is without a user id)."""
    return ANON_PREFIX + anonymous_id


def anonymous_of(actor: str) -> str | None:
    """The inverse of `anon_actor`: the anonymous id of a visitor's key, else None."""
    return actor[len(ANON_PREFIX) :] if actor.startswith(ANON_PREFIX) else None


def item_actor(item_id: str) -> str:
    """The online-store key of item window features (docs/architecture.md#stores-and-writers)."""
    return ITEM_PREFIX + item_id


def item_of(key: str) -> str | None:
    """The inverse of `item_actor`: the item id of an item key, else None."""
    return key[len(ITEM_PREFIX) :] if key.startswith(ITEM_PREFIX) else None


class EventContext(BaseModel):
    """Request context; known keys are typed, anything else is kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    session_id: str | None = None
    geo: str | None = None
    device: str | None = None


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=64)
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    anonymous_id: str | None = Field(default=None, min_length=1, max_length=256)
    item_id: str | None = Field(default=None, min_length=1, max_length=256)
    ts: datetime
    value: float | None = None
    context: EventContext = Field(default_factory=EventContext)
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("ts", mode="before")
    @classmethod
    def _parse_ts(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("ts must be ISO 8601 or epoch seconds")
        if isinstance(v, int | float):
            try:
                return datetime.fromtimestamp(float(v), tz=UTC)
            except (OverflowError, OSError, ValueError):  # 1e20, NaN: not a 500
                raise ValueError("epoch seconds out of the representable range") from None
        return v

    @field_validator("ts")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            return v.replace(tzinfo=UTC)
        try:
            return v.astimezone(UTC)
        except OverflowError:  # "0001-01-01T00:00:00+14:00" has no UTC equivalent
            raise ValueError("out of the representable range in UTC") from None

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and (v != v or v in (float("inf"), float("-inf"))):
            raise ValueError("value must be a finite number")
        return v

    @model_validator(mode="after")
    def _who(self) -> "Event":
        if self.user_id is None and self.anonymous_id is None:
            raise ValueError("an event needs user_id or anonymous_id")
        return self

    @property
    def actor(self) -> str:
        """The key the event is routed and partitioned by (user id, else anonymous id)."""
        return self.user_id if self.user_id is not None else ANON_PREFIX + str(self.anonymous_id)

    @property
    def ts_ms(self) -> int:
        return int(self.ts.timestamp() * 1000)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Event":
        return cls.model_validate_json(data)

    def to_row(self) -> dict[str, Any]:
        """Flat row for columnar stores: nested maps become JSON strings."""
        return {
            "event_id": self.event_id,
            "type": self.type,
            "user_id": self.user_id,
            "anonymous_id": self.anonymous_id,
            "item_id": self.item_id,
            "ts": self.ts,
            "value": self.value,
            "session_id": self.context.session_id,
            "context": json.dumps(self.context.model_dump(exclude_none=True), sort_keys=True),
            "properties": json.dumps(self.properties, sort_keys=True, default=str),
        }
