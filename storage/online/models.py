"""Tables of the SQL online store and the plain records the store hands out.

The SQLModel classes define the schema only; `storage.online.store.OnlineStore` talks to
them through SQLAlchemy Core and returns the frozen dataclasses below, so callers never
hold a session or a lazily loaded ORM object. Every timestamp is epoch milliseconds
(UTC) in a BIGINT: the same on SQLite and PostgreSQL, and `feature_age_ms` is one
subtraction. JSON columns use `sa.JSON` (TEXT on SQLite, JSON on PostgreSQL).
"""

import math
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from nextbest.features.state import SessionState

ModelStatus = Literal["candidate", "promoted", "retired", "rejected"]
_R = TypeVar("_R")
MODEL_STATUSES: tuple[ModelStatus, ...] = ("candidate", "promoted", "retired", "rejected")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _json(*, nullable: bool) -> Any:
    # none_as_null: a Python None is SQL NULL, not the JSON text 'null'.
    return Field(default=None, sa_type=sa.JSON(none_as_null=True), nullable=nullable)  # pyright: ignore[reportCallIssue]


# --- tables ---------------------------------------------------------------------------


class UserFeatureTable(SQLModel, table=True):
    """One online feature value per (user, feature, group); '' when not grouped."""

    __tablename__ = "nb_user_features"  # pyright: ignore[reportAssignmentType]

    user_id: str = Field(primary_key=True, max_length=256)
    feature: str = Field(primary_key=True, max_length=128)
    group_key: str = Field(default="", primary_key=True, max_length=256)
    value: float | None = Field(default=None)
    value_json: Any = _json(nullable=True)
    event_ts_ms: int = Field(sa_type=sa.BigInteger)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)
    source_partition: int | None = Field(default=None)
    source_offset: int | None = Field(default=None, sa_type=sa.BigInteger)


class UserStateTable(SQLModel, table=True):
    """Per-user session state: `session` is a versioned `SessionState` (its JSON), the
    session vector is packed float32 (see `pack_vector`)."""

    __tablename__ = "nb_user_state"  # pyright: ignore[reportAssignmentType]

    user_id: str = Field(primary_key=True, max_length=256)
    recent_items: Any = _json(nullable=False)
    session: Any = _json(nullable=False)
    session_vector: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    event_ts_ms: int = Field(sa_type=sa.BigInteger)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


class IdentityAliasTable(SQLModel, table=True):
    __tablename__ = "nb_identity_aliases"  # pyright: ignore[reportAssignmentType]

    anonymous_id: str = Field(primary_key=True, max_length=256)
    user_id: str = Field(index=True, max_length=256)
    linked_at_ms: int = Field(sa_type=sa.BigInteger)


class StreamOffsetTable(SQLModel, table=True):
    """Last source offset a sink applied, written in the same transaction as its rows."""

    __tablename__ = "nb_stream_offsets"  # pyright: ignore[reportAssignmentType]

    consumer: str = Field(primary_key=True, max_length=128)
    partition: int = Field(primary_key=True)
    committed_offset: int = Field(sa_type=sa.BigInteger)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


class StreamStatusTable(SQLModel, table=True):
    """The stream's heartbeat per source partition (`storage.online.status`): how far
    it has read, when it was last alive and when it last moved forward, and how many
    records it turned into dead letters."""

    __tablename__ = "nb_stream_status"  # pyright: ignore[reportAssignmentType]

    partition: int = Field(primary_key=True)
    next_offset: int = Field(sa_type=sa.BigInteger)
    dead_letters: int = Field(default=0, sa_type=sa.BigInteger)
    heartbeat_ms: int = Field(sa_type=sa.BigInteger)
    progress_ms: int = Field(sa_type=sa.BigInteger)


class CachedDecisionTable(SQLModel, table=True):
    __tablename__ = "nb_cached_decisions"  # pyright: ignore[reportAssignmentType]

    user_id: str = Field(primary_key=True, max_length=256)
    surface: str = Field(default="default", primary_key=True, max_length=64)
    actions: Any = _json(nullable=False)
    model_version: str | None = Field(default=None, max_length=128)
    created_at_ms: int = Field(sa_type=sa.BigInteger)


class ModelRegistryTable(SQLModel, table=True):
    __tablename__ = "nb_models"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        sa.CheckConstraint(
            "status in ('candidate', 'promoted', 'retired', 'rejected')",
            name="ck_nb_models_status",
        ),
        # At most one promoted model per name, whatever a racing writer does.
        sa.Index(
            "ux_nb_models_promoted",
            "name",
            unique=True,
            sqlite_where=sa.text("status = 'promoted'"),
            postgresql_where=sa.text("status = 'promoted'"),
        ),
    )

    version: str = Field(primary_key=True, max_length=128)
    name: str = Field(default="default", max_length=128)
    status: str = Field(default="candidate", sa_type=sa.String(16))
    metrics: Any = _json(nullable=False)
    params: Any = _json(nullable=False)
    artifact_path: str | None = Field(default=None)
    data_version: str | None = Field(default=None, max_length=256)
    created_at_ms: int = Field(sa_type=sa.BigInteger)
    promoted_at_ms: int | None = Field(default=None, sa_type=sa.BigInteger)


class ApiKeyTable(SQLModel, table=True):
    __tablename__ = "nb_api_keys"  # pyright: ignore[reportAssignmentType]

    key_id: str = Field(primary_key=True, max_length=64)
    hashed_secret: str = Field(max_length=512)
    scopes: Any = _json(nullable=False)
    created_at_ms: int = Field(sa_type=sa.BigInteger)
    revoked: bool = Field(default=False)


def _t(name: str) -> sa.Table:
    return SQLModel.metadata.tables[name]


FEATURES = _t("nb_user_features")
STATES = _t("nb_user_state")
ALIASES = _t("nb_identity_aliases")
OFFSETS = _t("nb_stream_offsets")
STATUS = _t("nb_stream_status")
DECISIONS = _t("nb_cached_decisions")
MODELS = _t("nb_models")
API_KEYS = _t("nb_api_keys")
ONLINE_TABLES: tuple[sa.Table, ...] = (
    FEATURES,
    STATES,
    ALIASES,
    OFFSETS,
    DECISIONS,
    MODELS,
    API_KEYS,
    STATUS,
)


# --- records (what the store accepts and returns) ------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """An online feature value. `value` is the numeric value; `value_json` carries
    non-scalar values (lists, maps). `updated_at_ms` is set by the store on write."""

    user_id: str
    feature: str
    value: float | None
    event_ts_ms: int
    group_key: str = ""
    value_json: Any = None
    source_partition: int | None = None
    source_offset: int | None = None
    updated_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class UserState:
    """One `nb_user_state` row; `session` is the typed state decide reads."""

    user_id: str
    event_ts_ms: int
    recent_items: list[Any] = field(default_factory=list)
    session: SessionState = field(default_factory=SessionState)
    session_vector: list[float] | None = None
    updated_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Alias:
    anonymous_id: str
    user_id: str
    linked_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CachedDecision:
    """Precomputed actions for a user on a surface, as written by the batch side."""

    user_id: str
    actions: list[dict[str, Any]]
    model_version: str | None = None
    surface: str = "default"
    created_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    version: str
    name: str
    status: ModelStatus
    metrics: dict[str, Any]
    params: dict[str, Any]
    artifact_path: str | None
    data_version: str | None
    created_at_ms: int
    promoted_at_ms: int | None


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    hashed_secret: str
    scopes: list[str]
    created_at_ms: int
    revoked: bool


# --- record <-> row mapping -----------------------------------------------------------

FeatureInput = FeatureRow | Mapping[str, Any]
StateInput = UserState | Mapping[str, Any]
AliasInput = Alias | Mapping[str, Any]
DecisionInput = CachedDecision | Mapping[str, Any]


def pack_vector(vector: Iterable[float] | None) -> bytes | None:
    """Little-endian float32: 4 bytes a dimension on both dialects."""
    if vector is None:
        return None
    values = [float(x) for x in vector]
    return struct.pack(f"<{len(values)}f", *values)


def unpack_vector(blob: bytes | None) -> list[float] | None:
    if blob is None:
        return None
    return list(struct.unpack(f"<{len(blob) // 4}f", bytes(blob)))


def record_params(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _coerce(cls: type[_R], row: _R | Mapping[str, Any]) -> _R:
    return cls(**row) if isinstance(row, Mapping) else cast(_R, row)


def _finite(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return out


def feature_params(row: FeatureInput, now: int) -> dict[str, Any]:
    r = _coerce(FeatureRow, row)
    params = record_params(r)
    params["value"] = _finite(r.value, f"feature {r.feature!r} value")
    params["updated_at_ms"] = now  # write time, always the store's clock
    return params


def state_params(row: StateInput, now: int) -> dict[str, Any]:
    r = _coerce(UserState, row)
    params = record_params(r)
    params["recent_items"] = list(r.recent_items)
    params["session"] = SessionState.load(r.session).to_builtins()
    params["session_vector"] = pack_vector(r.session_vector)
    params["updated_at_ms"] = now
    return params


def alias_params(row: AliasInput, now: int) -> dict[str, Any]:
    r = _coerce(Alias, row)
    params = record_params(r)
    params["linked_at_ms"] = r.linked_at_ms if r.linked_at_ms is not None else now
    return params


def decision_params(row: DecisionInput, now: int) -> dict[str, Any]:
    r = _coerce(CachedDecision, row)
    params = record_params(r)
    params["actions"] = [dict(a) for a in r.actions]
    params["created_at_ms"] = r.created_at_ms if r.created_at_ms is not None else now
    return params


def state_record(m: Mapping[Any, Any]) -> UserState:
    """A row as read; `session` may be JSON text (SQLite) or parsed (PostgreSQL).
    Raises `StateVersionError` for a session of a layout this code does not read."""
    return UserState(
        user_id=m["user_id"],
        event_ts_ms=m["event_ts_ms"],
        recent_items=list(m["recent_items"] or []),
        session=SessionState.load(m["session"]),
        session_vector=unpack_vector(m["session_vector"]),
        updated_at_ms=m["updated_at_ms"],
    )


def model_record(m: Mapping[Any, Any]) -> ModelRecord:
    return ModelRecord(**m)
