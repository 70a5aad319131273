"""Typed answers of the API, mirroring `serving/schemas.py` (which the core cannot import).

Plain frozen dataclasses built from the JSON bodies; unknown keys are ignored so an
older client keeps working against a newer API that adds fields.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Scalar = str | int | float | bool | None
ServedFrom = Literal["realtime", "cached", "fallback"]
Outcome = Literal["impression", "click", "conversion", "dismiss"]
ErasureState = Literal["running", "pending", "done", "failed"]


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class Rejection:
    """An event the API refused: `index` into the events given to `send_events`."""

    index: int
    reason: str
    event_id: str | None = None


@dataclass(frozen=True)
class FailedBatch:
    """A batch not stored after its retries (or refused as a whole: 400, 401, 413...):
    events `start` to `start + size - 1` of the input. Resending them is safe, their
    ids were fixed before the first attempt."""

    start: int
    size: int
    reason: str
    status_code: int | None = None


@dataclass
class SendResult:
    """What `send_events` achieved. `event_ids` are the stored events' ids (the
    client's when it assigned them); `dropped` were valid but not stored (no consent);
    `aggregated` were stored without their person; `retries` counts repeated attempts."""

    sent: int = 0
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    dropped: list[Rejection] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    aggregated: int = 0
    failed: list[FailedBatch] = field(default_factory=list)
    retries: int = 0

    @property
    def ok(self) -> bool:
        """Every event was stored: nothing rejected, dropped or left in a failed batch."""
        return not (self.rejected or self.dropped or self.failed)

    def add_body(self, body: dict[str, Any], start: int) -> None:
        """Fold one batch's `EventsOut` in, shifting indices by the batch's `start`."""
        self.accepted += int(body.get("accepted", 0))
        self.aggregated += int(body.get("aggregated", 0))
        self.event_ids.extend(body.get("event_ids") or [])
        for key, target in (("rejected", self.rejected), ("dropped", self.dropped)):
            for item in body.get(key) or []:
                target.append(
                    Rejection(
                        start + int(item.get("index", 0)),
                        str(item.get("reason", "")),
                        item.get("event_id"),
                    )
                )


@dataclass(frozen=True)
class Action:
    action_id: str
    item_id: str | None
    score: float
    source: str
    reasons: list[str]
    title: str | None = None
    attributes: dict[str, Scalar] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Action":
        return cls(
            action_id=data["action_id"],
            item_id=data.get("item_id"),
            score=float(data["score"]),
            source=data["source"],
            reasons=list(data.get("reasons") or []),
            title=data.get("title"),
            attributes=dict(data.get("attributes") or {}),
        )


@dataclass(frozen=True)
class Decision:
    decision_id: str
    user_id: str
    surface: str
    actions: list[Action]
    served_from: ServedFrom
    model_version: str | None
    feature_age_ms: int | None
    degraded: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Decision":
        return cls(
            decision_id=data["decision_id"],
            user_id=data["user_id"],
            surface=data["surface"],
            actions=[Action.from_json(a) for a in data.get("actions") or []],
            served_from=data["served_from"],
            model_version=data.get("model_version"),
            feature_age_ms=data.get("feature_age_ms"),
            degraded=list(data.get("degraded") or []),
        )


@dataclass(frozen=True)
class FeedbackResult:
    accepted: bool
    decision_id: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FeedbackResult":
        return cls(accepted=bool(data["accepted"]), decision_id=data["decision_id"])


@dataclass(frozen=True)
class Feature:
    feature: str
    group: str
    value: float | None
    value_json: Any
    event_ts: datetime
    updated_at: datetime | None
    age_ms: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Feature":
        event_ts = _dt(data["event_ts"])
        assert event_ts is not None
        return cls(
            feature=data["feature"],
            group=data.get("group", ""),
            value=data.get("value"),
            value_json=data.get("value_json"),
            event_ts=event_ts,
            updated_at=_dt(data.get("updated_at")),
            age_ms=int(data["age_ms"]),
        )


@dataclass(frozen=True)
class UserState:
    recent_items: list[Any]
    session_id: str | None
    has_session_vector: bool
    event_ts: datetime
    updated_at: datetime | None
    age_ms: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UserState":
        event_ts = _dt(data["event_ts"])
        assert event_ts is not None
        return cls(
            recent_items=list(data.get("recent_items") or []),
            session_id=data.get("session_id"),
            has_session_vector=bool(data.get("has_session_vector")),
            event_ts=event_ts,
            updated_at=_dt(data.get("updated_at")),
            age_ms=int(data["age_ms"]),
        )


@dataclass(frozen=True)
class UserFeatures:
    """`resolved_user_id` is the user an anonymous id is linked to (else the same id)."""

    user_id: str
    resolved_user_id: str
    features: list[Feature]
    state: UserState | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UserFeatures":
        state = data.get("state")
        return cls(
            user_id=data["user_id"],
            resolved_user_id=data["resolved_user_id"],
            features=[Feature.from_json(f) for f in data.get("features") or []],
            state=UserState.from_json(state) if state else None,
        )

    def value(self, feature: str, group: str = "") -> float | None:
        """One feature's value (None when the stream wrote no such row)."""
        for row in self.features:
            if row.feature == feature and row.group == group:
                return row.value
        return None


@dataclass(frozen=True)
class Erasure:
    """An erasure job; `stores` maps each store to done, pending or failed."""

    job_id: str
    user_id: str
    status: ErasureState
    stores: dict[str, str]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Erasure":
        created, updated = _dt(data["created_at"]), _dt(data["updated_at"])
        assert created is not None and updated is not None
        return cls(
            job_id=data["job_id"],
            user_id=data["user_id"],
            status=data["status"],
            stores=dict(data.get("stores") or {}),
            created_at=created,
            updated_at=updated,
        )
