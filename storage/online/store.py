"""The online store: fresh per-user features and state, identity aliases, stream offsets,
cached decisions, the model registry and API keys, on SQLite or PostgreSQL.

Every public method is one transaction. Writes go through `write_engine` (SQLite
`BEGIN IMMEDIATE`, see `storage.online.engine`); upserts are dialect-native
`INSERT ... ON CONFLICT DO UPDATE`, executed in chunks, with duplicates inside one call
collapsed (last wins) because PostgreSQL refuses to update a row twice in one statement.
Reads return the frozen dataclasses of `storage.online.models`, never ORM objects.
"""

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from nextbest.features.state import SessionState
from nextbest.ingest.events import anon_actor
from nextbest.settings import Settings
from storage.online.consent import CONSENT
from storage.online.engine import create_online_engine, is_sqlite, write_engine
from storage.online.models import (
    ALIASES,
    API_KEYS,
    DECISIONS,
    FEATURES,
    MODELS,
    OFFSETS,
    ONLINE_TABLES,
    STATES,
    Alias,
    AliasInput,
    ApiKey,
    CachedDecision,
    DecisionInput,
    FeatureInput,
    FeatureRow,
    ModelRecord,
    ModelStatus,
    StateInput,
    UserState,
    alias_params,
    decision_params,
    feature_params,
    model_record,
    now_ms,
    pack_vector,
    record_params,
    state_params,
    state_record,
)
from storage.online.sql import anonymous_ids_of, id_chunks, insert, linked_users, upsert

_DDL_LOCK_KEY = 0x6E62_6F6E  # PostgreSQL advisory lock serialising concurrent create_all


class OnlineStore:
    """The only gateway to the SQL online store. Thread-safe; share one per process."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._writer = write_engine(engine)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, pool_size: int | None = None, create_tables: bool = True
    ) -> Self:
        store = cls(create_online_engine(settings.online_database_url, pool_size=pool_size))
        if create_tables:
            store.create_all()
        return store

    def create_all(self) -> None:
        """Create missing tables; safe to run from several processes at once."""
        with self._writer.begin() as conn:
            if not is_sqlite(self.engine):
                conn.execute(sa.text("select pg_advisory_xact_lock(:k)"), {"k": _DDL_LOCK_KEY})
            ONLINE_TABLES[0].metadata.create_all(conn, tables=[*ONLINE_TABLES, CONSENT])

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("select 1"))
        except SQLAlchemyError:
            return False
        return True

    # --- stream sink ----------------------------------------------------------------

    def apply_stream_batch(
        self,
        *,
        consumer: str,
        partition: int,
        offset: int,
        features: Sequence[FeatureInput] = (),
        states: Sequence[StateInput] = (),
        aliases: Sequence[AliasInput] = (),
    ) -> bool:
        """Write rows and advance (consumer, partition) to `offset` in one transaction.

        `offset` is the last source offset contained in the batch. If the stored offset
        is already >= `offset` nothing is written and False is returned, so replaying a
        batch after a crash is a no-op. Rows should carry absolute values, not deltas.
        """
        now = now_ms()
        feature_rows = [feature_params(r, now) for r in features]
        state_rows = [state_params(r, now) for r in states]
        alias_rows = [alias_params(r, now) for r in aliases]
        with self._writer.begin() as conn:
            if not _advance_offset(conn, consumer, partition, offset, now):
                return False
            upsert(conn, FEATURES, feature_rows)
            upsert(conn, STATES, state_rows)
            upsert(conn, ALIASES, alias_rows)
        return True

    def write_stream_rows(
        self,
        features: Sequence[FeatureRow] = (),
        states: Sequence[UserState] = (),
        aliases: Sequence[Alias] = (),
    ) -> int:
        """The stream sink's hot path: features, states and aliases in ONE transaction.

        Same effect as `upsert_features` + `upsert_states` + `link_alias` (last row per
        key wins, `updated_at_ms` is the store's clock), but one BEGIN/COMMIT and one
        DB-API `executemany` of a prebuilt `INSERT ... ON CONFLICT DO UPDATE` per table,
        skipping SQLAlchemy's per-row statement compilation and bind processing, which
        dominated the stream's profile. Returns the number of rows written.
        """
        now = now_ms()
        dumps = json.dumps
        feature_rows = {
            (r.user_id, r.feature, r.group_key): (
                r.user_id,
                r.feature,
                r.group_key,
                _finite_value(r),
                None if r.value_json is None else dumps(r.value_json),
                r.event_ts_ms,
                now,
                r.source_partition,
                r.source_offset,
            )
            for r in features
        }
        state_rows = {
            r.user_id: (
                r.user_id,
                dumps(list(r.recent_items)),
                SessionState.load(r.session).encode().decode(),  # TEXT / CAST AS JSON
                pack_vector(r.session_vector),
                r.event_ts_ms,
                now,
            )
            for r in states
        }
        alias_rows = {
            a.anonymous_id: (
                a.anonymous_id,
                a.user_id,
                a.linked_at_ms if a.linked_at_ms is not None else now,
            )
            for a in aliases
        }
        translate = self.engine.get_execution_options().get("schema_translate_map") or {}
        sql = _bulk_sql(self.engine.dialect.name, translate.get(None))
        with self._writer.begin() as conn:
            for table, rows in (
                (FEATURES, feature_rows),
                (STATES, state_rows),
                (ALIASES, alias_rows),
            ):
                if rows:
                    conn.exec_driver_sql(sql[table.name], list(rows.values()))
        return len(feature_rows) + len(state_rows) + len(alias_rows)

    def committed_offsets(self, consumer: str) -> dict[int, int]:
        """partition -> last applied offset; resume reading at offset + 1."""
        stmt = sa.select(OFFSETS.c.partition, OFFSETS.c.committed_offset).where(
            OFFSETS.c.consumer == consumer
        )
        with self.engine.connect() as conn:
            return {int(p): int(o) for p, o in conn.execute(stmt)}

    # --- features and state -----------------------------------------------------------

    def upsert_features(self, rows: Sequence[FeatureInput]) -> int:
        now = now_ms()
        params = [feature_params(r, now) for r in rows]
        with self._writer.begin() as conn:
            return upsert(conn, FEATURES, params)

    def get_features(self, user_id: str) -> list[FeatureRow]:
        return self.get_features_many([user_id]).get(user_id, [])

    def get_features_many(self, user_ids: Sequence[str]) -> dict[str, list[FeatureRow]]:
        """Features of several users (one snapshot), each ordered by feature then group."""
        out: dict[str, list[FeatureRow]] = {}
        with self.engine.connect() as conn:
            for ids in id_chunks(user_ids):
                stmt = (
                    sa.select(FEATURES)
                    .where(FEATURES.c.user_id.in_(ids))
                    .order_by(FEATURES.c.user_id, FEATURES.c.feature, FEATURES.c.group_key)
                )
                for m in conn.execute(stmt).mappings():
                    out.setdefault(m["user_id"], []).append(FeatureRow(**m))
        return out

    def upsert_states(self, rows: Sequence[StateInput]) -> int:
        now = now_ms()
        params = [state_params(r, now) for r in rows]
        with self._writer.begin() as conn:
            return upsert(conn, STATES, params)

    def get_state(self, user_id: str) -> UserState | None:
        return self.get_states([user_id]).get(user_id)

    def get_states(self, user_ids: Sequence[str]) -> dict[str, UserState]:
        out: dict[str, UserState] = {}
        with self.engine.connect() as conn:
            for ids in id_chunks(user_ids):
                stmt = sa.select(STATES).where(STATES.c.user_id.in_(ids))
                out.update((m["user_id"], state_record(m)) for m in conn.execute(stmt).mappings())
        return out

    # --- identity -------------------------------------------------------------------

    def link_alias(
        self, anonymous_id: str, user_id: str, *, linked_at_ms: int | None = None
    ) -> None:
        """Point `anonymous_id` at `user_id`; a later link overwrites an earlier one."""
        params = alias_params(Alias(anonymous_id, user_id, linked_at_ms), now_ms())
        with self._writer.begin() as conn:
            upsert(conn, ALIASES, [params])

    def resolve(self, anonymous_id: str) -> str | None:
        """The user an identify event linked `anonymous_id` to, else None."""
        with self.engine.connect() as conn:
            return linked_users(conn, [anonymous_id]).get(anonymous_id)

    def aliases_of(self, user_id: str) -> list[str]:
        with self.engine.connect() as conn:
            return anonymous_ids_of(conn, user_id)

    # --- cached decisions -------------------------------------------------------------

    def put_cached_decisions(self, rows: Sequence[DecisionInput]) -> int:
        now = now_ms()
        params = [decision_params(r, now) for r in rows]
        with self._writer.begin() as conn:
            return upsert(conn, DECISIONS, params)

    def get_cached_decision(self, user_id: str, surface: str = "default") -> CachedDecision | None:
        stmt = sa.select(DECISIONS).where(
            DECISIONS.c.user_id == user_id, DECISIONS.c.surface == surface
        )
        with self.engine.connect() as conn:
            m = conn.execute(stmt).mappings().first()
        return None if m is None else CachedDecision(**m)

    # --- model registry -------------------------------------------------------------

    def register_model(
        self,
        *,
        version: str,
        name: str = "default",
        metrics: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        artifact_path: str | None = None,
        data_version: str | None = None,
        status: ModelStatus = "candidate",
        created_at_ms: int | None = None,
    ) -> ModelRecord:
        """Insert a model version; registering it again refreshes metrics, params and
        artifact but keeps its status (promotion only via `promote_model`)."""
        if status == "promoted":
            raise ValueError("register as a candidate, then call promote_model(version)")
        row = {
            "version": version,
            "name": name,
            "status": status,
            "metrics": dict(metrics or {}),
            "params": dict(params or {}),
            "artifact_path": artifact_path,
            "data_version": data_version,
            "created_at_ms": created_at_ms if created_at_ms is not None else now_ms(),
            "promoted_at_ms": None,
        }
        refresh = ("metrics", "params", "artifact_path", "data_version")
        with self._writer.begin() as conn:
            upsert(conn, MODELS, [row], update=refresh)
            return _model_in(conn, version)

    def promote_model(self, version: str) -> ModelRecord:
        """Promote `version`; the model previously promoted under its name is retired in
        the same transaction. Raises LookupError for an unknown version."""
        with self._writer.begin() as conn:
            name = conn.execute(
                sa.select(MODELS.c.name).where(MODELS.c.version == version)
            ).scalar_one_or_none()
            if name is None:
                raise LookupError(f"unknown model version {version!r}")
            # Lock every version of this name so concurrent promotions serialise (PostgreSQL).
            conn.execute(
                sa.select(MODELS.c.version).where(MODELS.c.name == name).with_for_update()
            ).all()
            current = _model_in(conn, version)
            if current.status == "promoted":
                return current
            conn.execute(
                sa.update(MODELS)
                .where(MODELS.c.name == name, MODELS.c.status == "promoted")
                .values(status="retired")
            )
            conn.execute(
                sa.update(MODELS)
                .where(MODELS.c.version == version)
                .values(status="promoted", promoted_at_ms=now_ms())
            )
            return _model_in(conn, version)

    def set_model_status(self, version: str, status: ModelStatus) -> ModelRecord:
        """Mark a version candidate/retired/rejected ('promoted' goes via promote_model)."""
        if status == "promoted":
            return self.promote_model(version)
        with self._writer.begin() as conn:
            done = conn.execute(
                sa.update(MODELS).where(MODELS.c.version == version).values(status=status)
            )
            if done.rowcount == 0:
                raise LookupError(f"unknown model version {version!r}")
            return _model_in(conn, version)

    def promoted_model(self, name: str = "default") -> ModelRecord | None:
        stmt = sa.select(MODELS).where(MODELS.c.name == name, MODELS.c.status == "promoted")
        with self.engine.connect() as conn:
            m = conn.execute(stmt).mappings().first()
        return None if m is None else model_record(m)

    def get_model(self, version: str) -> ModelRecord | None:
        with self.engine.connect() as conn:
            m = conn.execute(sa.select(MODELS).where(MODELS.c.version == version)).mappings()
            first = m.first()
        return None if first is None else model_record(first)

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        """Newest first."""
        stmt = sa.select(MODELS).order_by(MODELS.c.created_at_ms.desc(), MODELS.c.version.desc())
        if name is not None:
            stmt = stmt.where(MODELS.c.name == name)
        with self.engine.connect() as conn:
            return [model_record(m) for m in conn.execute(stmt).mappings()]

    # --- API keys -------------------------------------------------------------------

    def create_api_key(self, key_id: str, hashed_secret: str, scopes: Sequence[str]) -> ApiKey:
        """Store an already-hashed secret; raises sqlalchemy IntegrityError on a duplicate."""
        key = ApiKey(key_id, hashed_secret, list(scopes), now_ms(), False)
        with self._writer.begin() as conn:
            conn.execute(sa.insert(API_KEYS).values(**record_params(key)))
        return key

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self.engine.connect() as conn:
            m = conn.execute(sa.select(API_KEYS).where(API_KEYS.c.key_id == key_id)).mappings()
            first = m.first()
        return None if first is None else ApiKey(**first)

    def revoke_api_key(self, key_id: str) -> bool:
        with self._writer.begin() as conn:
            stmt = sa.update(API_KEYS).where(API_KEYS.c.key_id == key_id).values(revoked=True)
            return conn.execute(stmt).rowcount > 0

    # --- erasure --------------------------------------------------------------------

    def delete_user(self, user_id: str) -> dict[str, int]:
        """Erase a user: features, state, cached decisions and consent (`nb_consent`)
        stored under the user id or under any of its anonymous actors (`anon_actor`), and
        every alias pointing at it.
        Returns rows removed per table name."""
        with self._writer.begin() as conn:
            anonymous = anonymous_ids_of(conn, user_id)
            actors = [user_id, *(anon_actor(a) for a in anonymous)]
            counts: dict[str, int] = {}
            for table in ERASED_TABLES[:-1]:
                result = conn.execute(sa.delete(table).where(table.c.user_id.in_(actors)))
                counts[table.name] = result.rowcount
            result = conn.execute(
                sa.delete(ALIASES).where(
                    sa.or_(ALIASES.c.user_id == user_id, ALIASES.c.anonymous_id == user_id)
                )
            )
            counts[ALIASES.name] = result.rowcount
        return counts

    def forget_actors(self, actors: Sequence[str]) -> int:
        """The stream's rows (features, state, cached decisions) of actors whose stream
        state expired (spec `state.ttl`). Not an erasure: aliases and consent stay.
        Returns rows removed."""
        removed = 0
        with self._writer.begin() as conn:
            for chunk in id_chunks(actors):
                for table in (FEATURES, STATES, DECISIONS):
                    result = conn.execute(sa.delete(table).where(table.c.user_id.in_(chunk)))
                    removed += result.rowcount
        return removed

    def vacuum_tables(self, names: Sequence[str]) -> None:
        """PostgreSQL: VACUUM the tables an erasure deleted from, so the dead tuples (a
        deleted user's rows) are reclaimed instead of lingering in the heap pages. A
        no-op elsewhere (SQLite has `scrub_sqlite`). VACUUM cannot run in a transaction."""
        if self.engine.dialect.name != "postgresql":
            return
        translate = self.engine.get_execution_options().get("schema_translate_map") or {}
        schema = translate.get(None)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in names:
                target = f'"{schema}"."{name}"' if schema else f'"{name}"'
                exists = conn.exec_driver_sql("SELECT to_regclass(%s)", (target,)).scalar()
                if exists is not None:  # the API's tables may not exist yet
                    conn.exec_driver_sql(f"VACUUM {target}")


# --- helpers ----------------------------------------------------------------------------

ERASED_TABLES = (FEATURES, STATES, DECISIONS, CONSENT, ALIASES)
"""What `delete_user` deletes from (aliases last: they are matched differently)."""


# Column order of `write_stream_rows` tuples; JSON columns are serialised text.
_BULK_COLUMNS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "nb_user_features": (
        (
            "user_id",
            "feature",
            "group_key",
            "value",
            "value_json",
            "event_ts_ms",
            "updated_at_ms",
            "source_partition",
            "source_offset",
        ),
        frozenset({"value_json"}),
    ),
    "nb_user_state": (
        ("user_id", "recent_items", "session", "session_vector", "event_ts_ms", "updated_at_ms"),
        frozenset({"recent_items", "session"}),
    ),
    "nb_identity_aliases": (("anonymous_id", "user_id", "linked_at_ms"), frozenset()),
}


def _finite_value(row: FeatureRow) -> float | None:
    """As `feature_params`: a feature value is a finite float or NULL."""
    if row.value is None:
        return None
    value = float(row.value)
    if not math.isfinite(value):
        raise ValueError(f"feature {row.feature!r} value must be finite, got {row.value!r}")
    return value


@functools.cache
def _bulk_sql(dialect: str, schema: str | None) -> dict[str, str]:
    """Raw upserts for `write_stream_rows`, in the driver's own parameter style
    (sqlite3: qmark; psycopg: format, JSON columns cast explicitly). Raw SQL bypasses
    SQLAlchemy's `schema_translate_map`, so the engine's default schema is applied here."""
    tables = {t.name: t for t in (FEATURES, STATES, ALIASES)}
    out: dict[str, str] = {}
    for name, (columns, json_columns) in _BULK_COLUMNS.items():
        table = tables[name]
        keys = [c.name for c in table.primary_key.columns]
        assert set(columns) == {c.name for c in table.c}, name
        if dialect == "sqlite":
            marks = ["?"] * len(columns)
        else:
            marks = ["CAST(%s AS JSON)" if c in json_columns else "%s" for c in columns]
        quoted = ", ".join(f'"{c}"' for c in columns)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in keys)
        target = f'"{schema}"."{name}"' if schema else f'"{name}"'
        out[name] = (
            f"INSERT INTO {target} ({quoted}) VALUES ({', '.join(marks)}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
        )
    return out


def _advance_offset(
    conn: sa.Connection, consumer: str, partition: int, offset: int, now: int
) -> bool:
    """Move the stored offset forward; False if it is already >= offset.

    A single conditional upsert with RETURNING: atomic on both dialects, and on
    PostgreSQL its row lock serialises two workers racing on one partition.
    """
    ins = insert(conn, OFFSETS).values(
        consumer=consumer, partition=partition, committed_offset=offset, updated_at_ms=now
    )
    stmt = ins.on_conflict_do_update(
        index_elements=["consumer", "partition"],
        set_={"committed_offset": ins.excluded.committed_offset, "updated_at_ms": now},
        where=OFFSETS.c.committed_offset < ins.excluded.committed_offset,
    ).returning(OFFSETS.c.committed_offset)
    return conn.execute(stmt).first() is not None


def _model_in(conn: sa.Connection, version: str) -> ModelRecord:
    m = conn.execute(sa.select(MODELS).where(MODELS.c.version == version)).mappings().one()
    return model_record(m)
