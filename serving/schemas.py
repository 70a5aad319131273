"""Request and response bodies of the HTTP API (msgspec structs: strict and fast).

Inputs forbid unknown fields so a misspelled key is a 400 with a message rather than
a silently ignored option. Events are the exception on purpose: `events` is a list of
arbitrary JSON values so each one is validated against the spec on its own and a bad
event is rejected with its index instead of failing the whole batch.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

Id = Annotated[str, Meta(min_length=1, max_length=256)]
SurfaceName = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
DecisionId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
Scalar = str | int | float | bool | None
ServedFrom = Literal["realtime", "cached", "fallback"]
Outcome = Literal["impression", "click", "conversion", "dismiss"]
Scope = Literal["ingest", "decide", "admin"]
MAX_EVENTS_PER_BATCH = 10_000
MAX_ITEMS_PER_BATCH = 10_000
MAX_CANDIDATES = 1000
MAX_FEATURE_ENTITIES = 1000


class EventsIn(Struct, forbid_unknown_fields=True):
    events: Annotated[list[Any], Meta(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]


class RejectedEvent(Struct):
    index: int
    reason: str
    event_id: str | None = None


class DroppedEvent(Struct):
    """A valid event not stored because its user has not consented (spec privacy)."""

    index: int
    reason: str
    event_id: str | None = None


class EventsOut(Struct):
    accepted: int
    rejected: list[RejectedEvent]
    event_ids: list[str]
    dropped: list[DroppedEvent] = []
    aggregated: int = 0
    """Accepted events stored without their person (privacy.consent aggregate)."""


class DecideIn(Struct, forbid_unknown_fields=True):
    """`user_id` is a known user id or `anon:<anonymous_id>` for a visitor."""

    user_id: Id
    k: Annotated[int, Meta(ge=1, le=100)] = 10
    surface: SurfaceName | None = None
    context: dict[Annotated[str, Meta(max_length=64)], Scalar] = {}
    exclude: Annotated[list[Id], Meta(max_length=1000)] = []
    candidates: (
        Annotated[
            list[Id],
            Meta(
                max_length=MAX_CANDIDATES,
                description="Re-rank only these items (Metarank `/rank`); unknown ids are "
                "ignored and listed in `unknown_candidates`.",
            ),
        ]
        | None
    ) = None


class ActionOut(Struct):
    """`title` and `attributes` let an answer be read, and shown, without a catalogue
    lookup (the API fills them from its in-memory catalog)."""

    action_id: str
    item_id: str | None
    score: float
    source: str
    reasons: list[str]
    title: Annotated[
        str | None, Meta(description="The offer's title, or the item's `title` attribute.")
    ] = None
    attributes: Annotated[
        dict[str, Scalar],
        Meta(description="The item's catalogue attributes the spec declares; {} for offers."),
    ] = {}


class DecideOut(Struct):
    decision_id: str
    user_id: str
    surface: str
    actions: list[ActionOut]
    served_from: ServedFrom
    model_version: str | None
    feature_age_ms: int | None
    degraded: list[str] = []
    unknown_candidates: Annotated[
        list[str],
        Meta(description="Given candidates neither the model nor the catalogue knows."),
    ] = []


class FeedbackIn(Struct, forbid_unknown_fields=True):
    decision_id: DecisionId
    user_id: Id
    outcome: Outcome
    action_id: Id | None = None
    item_id: Id | None = None
    ts: datetime | None = None
    value: float | None = None


class FeedbackOut(Struct):
    accepted: bool
    decision_id: str


class FeatureOut(Struct):
    feature: str
    group: str
    value: float | None
    value_json: Any
    event_ts: datetime
    updated_at: datetime | None
    age_ms: int


class StateOut(Struct):
    recent_items: list[Any]
    session_id: str | None
    has_session_vector: bool
    event_ts: datetime
    updated_at: datetime | None
    age_ms: int


class UserFeaturesOut(Struct):
    user_id: str
    resolved_user_id: str
    features: list[FeatureOut]
    state: StateOut | None


class ErasureOut(Struct):
    job_id: str
    user_id: str
    status: Literal["running", "pending", "done", "failed"]
    stores: dict[str, str]
    created_at: datetime
    updated_at: datetime


class HealthOut(Struct):
    status: Literal["ok"]


class ReadyOut(Struct):
    ready: bool
    checks: dict[str, str]
    model_version: str | None


class ErrorOut(Struct):
    """Litestar's error body: `detail` names the field; `extra` may add details."""

    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None


class ItemsIn(Struct, forbid_unknown_fields=True):
    """Each item is validated on its own, like events (`nextbest.decide.catalog`)."""

    items: Annotated[list[Any], Meta(min_length=1, max_length=MAX_ITEMS_PER_BATCH)]


class RejectedItemOut(Struct):
    index: int
    reason: str
    item_id: str | None = None


class ItemsOut(Struct):
    accepted: int
    rejected: list[RejectedItemOut]
    update_id: Annotated[
        str | None, Meta(description="Groups this request's rows in Delta `item_updates`.")
    ] = None
    version: Annotated[
        int | None, Meta(description="Catalogue change number given to this update.")
    ] = None


class SimilarItemOut(Struct):
    item_id: str
    score: Annotated[float, Meta(description="Cosine similarity to the item.")]
    title: str | None = None
    attributes: dict[str, Scalar] = {}


class SimilarOut(Struct):
    item_id: str
    source: Literal["model", "vectors"]
    model_version: str | None
    items: list[SimilarItemOut]


EntityKey = Annotated[str, Meta(min_length=1, max_length=64)]


class FeaturesIn(Struct, forbid_unknown_fields=True):
    """`entities`: `{"user_id": [...]}` (Feast's `entity_rows` as columns) or
    `[{"user_id": "u1"}, ...]`; one entity key, the spec's user or item key."""

    entities: dict[EntityKey, list[Id]] | list[dict[EntityKey, Id]]
    features: (
        Annotated[
            list[Annotated[str, Meta(min_length=1, max_length=128)]],
            Meta(max_length=256, description="Feature names; all of the entity's when absent."),
        ]
        | None
    ) = None


class EntityFeaturesOut(Struct):
    id: str
    resolved_id: str
    found: bool
    values: dict[str, Any]
    event_ts: dict[str, datetime | None]


class FeaturesOut(Struct):
    entity: str
    features: list[str]
    results: list[EntityFeaturesOut]
