"""The declarative spec: entities, events, features, actions, policies, schedules.

Pydantic models, frozen and `extra="forbid"`, so a typo is an error rather than a
silently ignored key. Structural checks live on the models; checks that cross
sections (an action naming an unknown feature, a group-by on a missing item
attribute) live in `nextbest.spec.checks`, and `nextbest.spec.loader` turns both into
problems that name the file, the line and the path. Table names, asset keys and
stream step ids derive from the names declared here.
"""

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StringConstraints,
    Tag,
    WithJsonSchema,
    field_validator,
)

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

_DURATION = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?]+$")

AttributeType = Literal["string", "int", "float", "bool"]
PropertyType = Literal["string", "int", "float", "bool", "list", "object"]
Aggregation = Literal["count", "sum", "mean", "last", "distinct_count"]
CandidateSource = Literal["item_model", "vector", "trending", "cached", "popular"]
Fallback = Literal["cached", "popular"]
Operator = Literal["eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in"]


def parse_duration(text: str) -> timedelta:
    """'90s', '5m', '1h', '7d', '2w' -> timedelta; anything else is a ValueError."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration; write a positive number and one unit of "
            "s, m, h, d, w, e.g. '5m', '1h', '7d'"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class Duration(str):
    """A duration kept as written ('5m') so the spec round-trips; `.delta` parses it."""

    @property
    def delta(self) -> timedelta:
        return parse_duration(self)

    @property
    def seconds(self) -> float:
        return self.delta.total_seconds()


def _duration(value: Any) -> Duration:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration; write it as a string like '5m' or '7d'")
    parse_duration(value)
    return Duration(value.strip())


DurationText = Annotated[
    Duration,
    PlainValidator(_duration),
    WithJsonSchema({"type": "string", "pattern": _DURATION.pattern}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attribute(_Model):
    type: AttributeType
    text: bool = Field(default=False, description="Free text, used for cold-start vectors.")


class Entity(_Model):
    key: Name
    attributes: dict[Name, Attribute] = Field(default_factory=dict)


class Entities(_Model):
    user: Entity
    item: Entity


class Property(_Model):
    type: PropertyType
    required: bool = False
    pii: bool = Field(default=False, description="Pseudonymized with a keyed hash at ingest.")


class EventType(_Model):
    entity: Literal["item"] | None = Field(
        default="item", description="What the event touches; null for user-only events."
    )
    weight: float = Field(default=1.0, ge=0, description="Interaction weight for models.")
    value: Literal["none", "optional", "required"] = "none"
    identify: bool = Field(default=False, description="Links anonymous_id to user_id.")
    properties: dict[Name, Property] = Field(default_factory=dict)


class WindowFeature(_Model):
    """An aggregation over a sliding window, optionally per item attribute value."""

    kind: Literal["window"] = "window"
    entity: Literal["user", "item"] = "user"
    events: list[Name] = Field(min_length=1)
    agg: Aggregation
    field: str | None = Field(
        default=None,
        description="What sum/mean/last/distinct_count read: value, weight, item_id, "
        "an event property or an item attribute.",
    )
    window: DurationText = Field(description="e.g. '1h', '7d'")
    group_by: Name | None = Field(default=None, description="An item attribute.")


class LastNFeature(_Model):
    """The user's most recent distinct items."""

    kind: Literal["last_n"]
    events: list[Name] = Field(min_length=1)
    n: int = Field(default=20, ge=1, le=1000)


class SessionVectorFeature(_Model):
    """Time-decayed mean of the item vectors of the user's recent interactions."""

    kind: Literal["session_vector"]
    events: list[Name] = Field(min_length=1)
    half_life: DurationText
    max_items: int = Field(default=50, ge=1, le=1000)


def _feature_kind(value: Any) -> str:
    """`kind` may be omitted for the common windowed feature."""
    if isinstance(value, dict):
        return value.get("kind", "window")
    return getattr(value, "kind", "window")


Feature = Annotated[
    Annotated[WindowFeature, Tag("window")]
    | Annotated[LastNFeature, Tag("last_n")]
    | Annotated[SessionVectorFeature, Tag("session_vector")],
    Discriminator(_feature_kind),
]


class Condition(_Model):
    """`attr` is `item.<attribute>`, `user.<feature or attribute>` or `context.<key>`."""

    attr: str = Field(pattern=r"^(item|user|context)\.[a-z_][a-z0-9_]*$")
    op: Operator = "eq"
    value: Any = None


class Eligibility(_Model):
    exclude_seen: list[Name] = Field(
        default_factory=list, description="Drop items the user already had these events on."
    )
    where: list[Condition] = Field(default_factory=list)


class Cap(_Model):
    max: int = Field(ge=1)
    per: DurationText


class Action(_Model):
    kind: Literal["item", "offer", "content"]
    title: str | None = None
    surfaces: list[Name] = Field(default_factory=lambda: ["default"])
    eligibility: Eligibility = Field(default_factory=Eligibility)
    cap: Cap | None = None
    priority: float = Field(default=0.0, description="Added to the score of non-item actions.")


class Candidate(_Model):
    source: CandidateSource
    weight: float = Field(default=1.0, ge=0)
    limit: int = Field(default=100, ge=1, le=10000)
    feature: Name | None = Field(default=None, description="For trending: the counting feature.")


class Exploration(_Model):
    strategy: Literal["none", "epsilon_greedy", "thompson"] = "none"
    epsilon: float = Field(default=0.05, ge=0, le=1)


class OnlineModel(_Model):
    """The per-user online model (`nextbest.learn.online_model`): Beta-Bernoulli posteriors
    the stream learns from feedback, read by the decide path between retrains."""

    enabled: bool = True
    weight: float = Field(
        default=1.0, ge=0, le=10, description="Score units at most +/- weight/2 moves an action."
    )
    half_life: DurationText = Field(default=Duration("7d"), description="How fast feedback fades.")
    prior: float = Field(
        default=2.0, gt=0, le=1000, description="Pseudo-observations of the prior (mean 1/2)."
    )
    ignored_weight: float = Field(
        default=0.25, ge=0, le=1, description="An impression without click/dismissal, as a no."
    )


class Policy(_Model):
    surface: Name = "default"
    actions: list[Name] = Field(min_length=1)
    candidates: list[Candidate] = Field(min_length=1)
    latency_budget_ms: int = Field(default=50, ge=1, le=60000)
    fallbacks: list[Fallback] = Field(default_factory=lambda: ["cached", "popular"])
    max_per_group: int | None = Field(default=None, ge=1)
    group_by: Name | None = Field(default=None, description="Item attribute for diversity.")
    exploration: Exploration = Field(default_factory=Exploration)
    online_model: OnlineModel = Field(default_factory=OnlineModel)


class CronSchedule(_Model):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(
                f"{v!r} is not a cron expression; write five fields "
                "'minute hour day month weekday', e.g. '0 3 * * *'"
            )
        return v


class Schedules(_Model):
    retrain: CronSchedule | None = None
    maintenance: CronSchedule | None = None
    retrain_after_events: int | None = Field(
        default=None, ge=1, description="Sensor: retrain once this many new events arrived."
    )


ModelKind = Literal["ease", "item_knn"]
NO_DECAY = ("none", "off", "never")


def _half_lives(value: Any) -> tuple[Duration | None, ...]:
    """A list of durations, where "none" (or null) means no time decay."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("half_life: a non-empty list of durations or 'none', e.g. ['7d', 'none']")
    out: list[Duration | None] = []
    for v in value:
        out.append(None if v is None or str(v).strip().lower() in NO_DECAY else _duration(v))
    return tuple(dict.fromkeys(out))


HalfLives = Annotated[
    tuple[Duration | None, ...],
    PlainValidator(_half_lives),
    WithJsonSchema({"type": "array", "items": {"type": ["string", "null"]}, "minItems": 1}),
]


class Tune(_Model):
    """The search the model asset runs before each retrain (`nextbest.learn.tune`): every
    combination of the listed values is trained on the older part of the history and
    scored (nDCG@10) on the newest part; the best one is trained on everything. A list
    left out uses the defaults; the spec's own `l2`/`half_life`/`kind` always compete."""

    l2: tuple[Annotated[float, Field(gt=0)], ...] = Field(
        default=(50.0, 200.0, 1000.0, 3000.0, 10000.0), min_length=1
    )
    half_life: HalfLives = Field(default=(Duration("7d"), Duration("30d"), Duration("180d"), None))
    kinds: tuple[ModelKind, ...] = Field(default=("ease", "item_knn"), min_length=1)
    split: Literal["global", "user"] = Field(
        default="global",
        description="global: events after a time cut validate (as serving meets the future); "
        "user: each user's newest events (cuts sessions, so it favours short half-lives).",
    )
    validation_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    max_users: int = Field(default=2000, ge=10, description="Validation users scored (a sample).")
    max_items: int = Field(
        default=1000, ge=10, description="The search runs on this many most-used items."
    )


class Model(_Model):
    """Hyperparameters of the default recommender (EASE-class item model)."""

    kind: ModelKind = "ease"
    l2: float = Field(default=200.0, gt=0)
    neighbours: int = Field(default=200, ge=1)
    max_dense_items: int = Field(default=10000, ge=1)
    dim: int = Field(default=64, ge=2, le=1024)
    half_life: DurationText | None = Field(
        default=Duration("30d"), description="Time decay of interactions; 'none': no decay."
    )
    tune: Tune | None = Field(
        default_factory=Tune,
        description="Search l2/half_life/kind on a time-aware validation split at each "
        "retrain (true, or the search space); false pins the values above.",
    )

    @property
    def half_life_ms(self) -> float | None:
        return None if self.half_life is None else self.half_life.seconds * 1000

    @field_validator("half_life", mode="before")
    @classmethod
    def _no_decay(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in NO_DECAY else v

    @field_validator("tune", mode="before")
    @classmethod
    def _tune_flag(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v


class Consent(_Model):
    """Consent per user, carried by a user-level event type (see README, privacy).

    An event rather than a user attribute: consent changes over time and must reach
    the API and the stream in order with the behaviour it governs (the log is ordered
    per user), with a timestamp (newest wins) and an auditable record in bronze.
    """

    event: Name = Field(description="The event type that grants or revokes consent.")
    property: Name = Field(default="granted", description="Its boolean property.")
    default: Literal["granted", "denied"] = Field(
        default="denied", description="For users who never sent a consent event."
    )
    without_consent: Literal["drop", "aggregate"] = Field(
        default="drop",
        description="drop: keep nothing; aggregate: keep item events with the person "
        "removed (item popularity and trending still learn).",
    )


class Privacy(_Model):
    consent: Consent | None = None


class StateRetention(_Model):
    """How long the stream keeps an idle actor's (user, anonymous visitor, item) state.

    `ttl` counts from the actor's newest event time to the stream clock; past it the
    stream drops the actor's state and recovery snapshot, so random ids cannot grow
    memory without bound. Off (None) by default; never shorter than the longest
    window feature (the stream uses the longer of the two).
    """

    ttl: DurationText | None = Field(default=None, description="e.g. '180d'; unset keeps all")


class Spec(_Model):
    version: Literal[1] = 1
    name: Name
    entities: Entities
    events: dict[Name, EventType] = Field(min_length=1)
    features: dict[Name, Feature] = Field(default_factory=dict)
    actions: dict[Name, Action] = Field(min_length=1)
    policies: dict[Name, Policy] = Field(min_length=1)
    model: Model = Field(default_factory=Model)
    schedules: Schedules = Field(default_factory=Schedules)
    privacy: Privacy = Field(default_factory=Privacy)
    state: StateRetention = Field(default_factory=StateRetention)

    # Derived names: one place, so storage, Dagster and Bytewax agree.
    def window_features(self) -> dict[str, WindowFeature]:
        return {n: f for n, f in self.features.items() if isinstance(f, WindowFeature)}

    def identify_events(self) -> list[str]:
        return [n for n, e in self.events.items() if e.identify]

    def policy_for(self, surface: str) -> tuple[str, Policy]:
        for name, policy in self.policies.items():
            if policy.surface == surface:
                return name, policy
        raise KeyError(surface)

    @staticmethod
    def step_id(kind: str, name: str) -> str:
        """Stable Bytewax step id (recovery state is keyed by it)."""
        return f"{kind}_{name}"

    @staticmethod
    def asset_key(name: str) -> str:
        return name
