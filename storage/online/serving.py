"""What the API reads and writes in the online store beyond the shared records.

Kept apart from `storage.online.store` (which the stream and Dagster share) so the serving
additions stay additive: a one-connection snapshot read for `/v1/decide`, the top
item-entity window counts for trending, per-user action-cap counters and erasure jobs.
The two tables here are created by `ServingStore.ensure_tables`, next to the shared
ones, on SQLite and PostgreSQL alike.

Caps use fixed periods (`period_start = now - now % per`), so a counter is one row per
(user, action, period) and an increment is one upsert; rows of past periods are
deleted when the next one is written.
"""

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from nextbest.ingest.events import ITEM_PREFIX, anon_actor
from storage.online.engine import write_engine
from storage.online.models import (
    DECISIONS,
    FEATURES,
    STATES,
    CachedDecision,
    FeatureRow,
    UserState,
    now_ms,
    state_record,
)
from storage.online.sql import id_chunks, insert, resolve_actor, resolve_actor_sqlite, upsert
from storage.online.store import ERASED_TABLES, OnlineStore


class ActionCapTable(SQLModel, table=True):
    """How often an action was decided for a user in the current cap period."""

    __tablename__ = "nb_action_caps"  # pyright: ignore[reportAssignmentType]

    user_id: str = Field(primary_key=True, max_length=256)
    action: str = Field(primary_key=True, max_length=128)
    period_start_ms: int = Field(primary_key=True, sa_type=sa.BigInteger)
    count: int = Field(default=0)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


class ErasureJobTable(SQLModel, table=True):
    """An erasure request; `subject` is a keyed hash of the user id, never the id."""

    __tablename__ = "nb_erasure_jobs"  # pyright: ignore[reportAssignmentType]

    job_id: str = Field(primary_key=True, max_length=64)
    subject: str = Field(index=True, max_length=128)
    status: str = Field(max_length=16)
    stores: Any = Field(default=None, sa_type=sa.JSON(none_as_null=True), nullable=False)  # pyright: ignore[reportCallIssue]
    created_at_ms: int = Field(sa_type=sa.BigInteger)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


CAPS = SQLModel.metadata.tables["nb_action_caps"]
ERASURES = SQLModel.metadata.tables["nb_erasure_jobs"]
SERVING_TABLES: tuple[sa.Table, ...] = (CAPS, ERASURES)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision reads, from one connection."""

    actor: str
    state: UserState | None = None
    features: list[FeatureRow] = field(default_factory=list)
    cached: CachedDecision | None = None
    cap_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErasureJob:
    job_id: str
    subject: str
    status: str
    stores: dict[str, str]
    created_at_ms: int
    updated_at_ms: int


def _cols(table: sa.Table) -> list[str]:
    return [c.name for c in table.c]


def _loads(text: Any) -> Any:
    return json.loads(text) if isinstance(text, str | bytes) else text


_STATE_COLS = _cols(STATES)
_FEATURE_COLS = _cols(FEATURES)
_CACHED_COLS = _cols(DECISIONS)
_SQL_STATE = f"SELECT {', '.join(_STATE_COLS)} FROM {STATES.name} WHERE user_id = ?"
_SQL_FEATURES = (
    f"SELECT {', '.join(_FEATURE_COLS)} FROM {FEATURES.name} WHERE user_id = ? "
    "ORDER BY feature, group_key"
)
_SQL_CACHED = (
    f"SELECT {', '.join(_CACHED_COLS)} FROM {DECISIONS.name} WHERE user_id = ? AND surface = ?"
)
_SQL_CAPS = f"SELECT action, period_start_ms, count FROM {CAPS.name} WHERE user_id = ?"


def period_start(now: int, per_ms: int) -> int:
    return now - now % per_ms


class ServingStore:
    """Serving-side access to an `OnlineStore`'s engine (shares its pool)."""

    def __init__(self, store: OnlineStore) -> None:
        self.store = store
        self.engine = store.engine
        self._writer = write_engine(store.engine)

    def ensure_tables(self) -> None:
        with self._writer.begin() as conn:
            SQLModel.metadata.create_all(conn, tables=list(SERVING_TABLES))

    # --- decide -------------------------------------------------------------------

    def resolve_actor(self, conn: sa.Connection, actor: str) -> str:
        """`anon:<id>` -> the linked user id when an identify event linked them."""
        return resolve_actor(conn, actor)

    def snapshot(
        self,
        actor: str,
        *,
        surface: str,
        caps: Mapping[str, int] | None = None,
        now: int | None = None,
    ) -> Snapshot:
        """State, features, cached decision and cap counters of one user.

        `caps` maps action -> period length in ms; counts are for the current period.
        On SQLite the reads go straight to the DBAPI cursor (see `_sqlite_snapshot`).
        """
        if self.engine.dialect.name == "sqlite" and not self.engine.get_execution_options().get(
            "schema_translate_map"
        ):
            return self._sqlite_snapshot(actor, surface=surface, caps=caps, now=now)
        with self.engine.connect() as conn:
            resolved = self.resolve_actor(conn, actor)
            m = conn.execute(sa.select(STATES).where(STATES.c.user_id == resolved)).mappings()
            first = m.first()
            state = None if first is None else state_record(first)
            stmt = sa.select(FEATURES).where(FEATURES.c.user_id == resolved)
            features = [FeatureRow(**r) for r in conn.execute(stmt).mappings()]
            stmt = sa.select(DECISIONS).where(
                DECISIONS.c.user_id == resolved, DECISIONS.c.surface == surface
            )
            cached_row = conn.execute(stmt).mappings().first()
            counts: dict[str, int] = {}
            if caps:
                t = now if now is not None else now_ms()
                stmt = sa.select(CAPS.c.action, CAPS.c.period_start_ms, CAPS.c.count).where(
                    CAPS.c.user_id == resolved, CAPS.c.action.in_(list(caps))
                )
                for action, start, count in conn.execute(stmt):
                    if start == period_start(t, caps[action]):
                        counts[action] = int(count)
        return Snapshot(
            actor=resolved,
            state=state,
            features=features,
            cached=None if cached_row is None else CachedDecision(**cached_row),
            cap_counts=counts,
        )

    def _sqlite_snapshot(
        self, actor: str, *, surface: str, caps: Mapping[str, int] | None, now: int | None
    ) -> Snapshot:
        """The same reads as `snapshot` on a raw sqlite3 cursor.

        This is the /v1/decide hot path: SQLAlchemy's per-execution work (and the BEGIN
        our engine emits on every transaction) costs ~5x the queries themselves. Plain
        SELECTs in autocommit mode each read the latest committed WAL snapshot; the
        stream commits a user's state and features in one transaction, so the worst a
        decision can see is a state one batch newer than its features.
        """
        with closing(self.engine.raw_connection()) as raw:
            cur = raw.cursor()
            resolved = resolve_actor_sqlite(cur, actor)
            row = cur.execute(_SQL_STATE, (resolved,)).fetchone()
            state = None
            if row is not None:
                m = dict(zip(_STATE_COLS, row, strict=True))
                m["recent_items"] = _loads(m["recent_items"]) or []
                state = state_record(m)  # the session's JSON text: one typed decode
            features = []
            for row in cur.execute(_SQL_FEATURES, (resolved,)).fetchall():
                m = dict(zip(_FEATURE_COLS, row, strict=True))
                m["value_json"] = _loads(m["value_json"])
                features.append(FeatureRow(**m))
            row = cur.execute(_SQL_CACHED, (resolved, surface)).fetchone()
            cached = None
            if row is not None:
                m = dict(zip(_CACHED_COLS, row, strict=True))
                m["actions"] = _loads(m["actions"]) or []
                cached = CachedDecision(**m)
            counts: dict[str, int] = {}
            if caps:
                t = now if now is not None else now_ms()
                for action, start, count in cur.execute(_SQL_CAPS, (resolved,)).fetchall():
                    per = caps.get(action)
                    if per is not None and start == period_start(t, per):
                        counts[action] = int(count)
            cur.close()
        return Snapshot(resolved, state, features, cached, counts)

    def resolve(self, actor: str) -> str:
        with self.engine.connect() as conn:
            return self.resolve_actor(conn, actor)

    def top_entities(
        self,
        feature: str,
        *,
        prefix: str = ITEM_PREFIX,
        limit: int = 200,
        window_ms: int | None = None,
    ) -> list[tuple[str, float]]:
        """Entities with the highest value of an entity window feature (e.g. trending
        items from `item_views_1h`), prefix stripped. With `window_ms`, only entities
        whose latest event is within that window of the newest one: a window anchored
        at an item's last event keeps its old count after the item went quiet."""
        cond = [FEATURES.c.feature == feature, FEATURES.c.user_id.like(f"{prefix}%")]
        if window_ms is not None:
            newest = sa.select(sa.func.max(FEATURES.c.event_ts_ms)).where(*cond)
            cond.append(FEATURES.c.event_ts_ms >= newest.scalar_subquery() - window_ms)
        stmt = (
            sa.select(FEATURES.c.user_id, FEATURES.c.value)
            .where(*cond, FEATURES.c.value > 0)
            .order_by(FEATURES.c.value.desc(), FEATURES.c.user_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(u[len(prefix) :], float(v)) for u, v in conn.execute(stmt)]

    # --- caps -----------------------------------------------------------------------

    def increment_caps(
        self, hits: Sequence[tuple[str, str, int]], *, now: int | None = None
    ) -> int:
        """Count (user_id, action, period_ms) hits; drops counters of earlier periods."""
        if not hits:
            return 0
        t = now if now is not None else now_ms()
        totals: dict[tuple[str, str, int], int] = {}
        for user, action, per in hits:
            key = (user, action, period_start(t, per))
            totals[key] = totals.get(key, 0) + 1
        with self._writer.begin() as conn:
            ins = insert(conn, CAPS)
            for (user, action, start), n in totals.items():
                conn.execute(
                    sa.delete(CAPS).where(
                        CAPS.c.user_id == user,
                        CAPS.c.action == action,
                        CAPS.c.period_start_ms < start,
                    )
                )
                stmt = ins.values(
                    user_id=user, action=action, period_start_ms=start, count=n, updated_at_ms=t
                ).on_conflict_do_update(
                    index_elements=["user_id", "action", "period_start_ms"],
                    set_={"count": CAPS.c.count + n, "updated_at_ms": t},
                )
                conn.execute(stmt)
        return len(totals)

    # --- erasure --------------------------------------------------------------------

    def erase_user(self, user_id: str) -> dict[str, int]:
        """`OnlineStore.delete_user` plus this module's cap counters (user and aliases)."""
        actors = [user_id, *(anon_actor(a) for a in self.store.aliases_of(user_id))]
        with self._writer.begin() as conn:
            caps = conn.execute(sa.delete(CAPS).where(CAPS.c.user_id.in_(actors))).rowcount
        counts = self.store.delete_user(user_id)
        counts[CAPS.name] = caps
        return counts

    def forget_cached_decisions(self, user_ids: Sequence[str]) -> int:
        """Drop the cached decisions of these users (an asset run that scored a user an
        erasure removed meanwhile); `scrub` afterwards to drop the bytes too."""
        removed = 0
        with self._writer.begin() as conn:
            for chunk in id_chunks(user_ids):
                stmt = sa.delete(DECISIONS).where(DECISIONS.c.user_id.in_(chunk))
                removed += conn.execute(stmt).rowcount
        return removed

    def put_erasure_job(self, job: ErasureJob) -> None:
        row = {
            "job_id": job.job_id,
            "subject": job.subject,
            "status": job.status,
            "stores": dict(job.stores),
            "created_at_ms": job.created_at_ms,
            "updated_at_ms": job.updated_at_ms,
        }
        with self._writer.begin() as conn:
            upsert(conn, ERASURES, [row], update=("status", "stores", "updated_at_ms"))

    def update_erasure_stores(self, job_id: str, updates: Mapping[str, str]) -> ErasureJob | None:
        """Merge per-store results into a job and recompute its status.

        The API and the stream both report on one job, so this is a read-modify-write
        under the write lock (BEGIN IMMEDIATE on SQLite, FOR UPDATE on PostgreSQL).
        """
        with self._writer.begin() as conn:
            stmt = sa.select(ERASURES).where(ERASURES.c.job_id == job_id)
            if conn.dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            m = conn.execute(stmt).mappings().first()
            if m is None:
                return None
            stores = {**dict(m["stores"] or {}), **updates}
            status, now = erasure_status(stores), now_ms()
            conn.execute(
                sa.update(ERASURES)
                .where(ERASURES.c.job_id == job_id)
                .values(stores=stores, status=status, updated_at_ms=now)
            )
        return ErasureJob(job_id, m["subject"], status, stores, m["created_at_ms"], now)

    def erasure_job(self, job_id: str) -> ErasureJob | None:
        with self.engine.connect() as conn:
            m = conn.execute(sa.select(ERASURES).where(ERASURES.c.job_id == job_id)).mappings()
            row = m.first()
        return None if row is None else ErasureJob(**{**row, "stores": dict(row["stores"] or {})})

    def scrub(self) -> bool:
        """SQLite: rebuild the file and empty the WAL, so deleted rows leave no bytes
        in free pages or old WAL frames; False while a reader pins the WAL (retry).
        PostgreSQL: VACUUM the tables an erasure deletes from (`OnlineStore.vacuum_tables`)."""
        url = self.engine.url
        if url.get_backend_name() == "postgresql":
            self.store.vacuum_tables([t.name for t in (*ERASED_TABLES, CAPS)])
            return True
        if url.get_backend_name() != "sqlite" or not url.database:
            return True
        return scrub_sqlite(url.database)

    def unfinished_erasure_jobs(self) -> list[ErasureJob]:
        """Jobs still running or pending, oldest first (resumed when the API starts)."""
        stmt = (
            sa.select(ERASURES)
            .where(ERASURES.c.status.in_(("running", "pending")))
            .order_by(ERASURES.c.created_at_ms)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [ErasureJob(**{**m, "stores": dict(m["stores"] or {})}) for m in rows]

    def latest_erasure_job(self, subject: str) -> ErasureJob | None:
        stmt = (
            sa.select(ERASURES)
            .where(ERASURES.c.subject == subject)
            .order_by(ERASURES.c.created_at_ms.desc(), ERASURES.c.job_id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            m = conn.execute(stmt).mappings().first()
        if m is None:
            return None
        return ErasureJob(**{**m, "stores": dict(m["stores"] or {})})


def erasure_status(stores: Mapping[str, str]) -> str:
    """failed if any store failed, done when every store is done, pending when the rest
    only waits for a retention (Kafka records age out), else running."""
    if any(v.startswith("failed") for v in stores.values()):
        return "failed"
    if all(v.startswith("done") for v in stores.values()):
        return "done"
    settled = all(v.startswith(("done", "retention")) for v in stores.values())
    return "pending" if settled else "running"


def scrub_sqlite(path: str, *, busy_timeout_ms: int = 5000) -> bool:
    """VACUUM a SQLite file and truncate its WAL (erasure: deleted rows stay readable in
    free pages and WAL frames otherwise). Other connections may stay open; returns
    False when the WAL could not be fully checkpointed (a reader holds it: retry)."""
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        conn.execute("VACUUM")
        busy, _frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0
    finally:
        conn.close()
