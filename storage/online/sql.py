"""The online store's SQL helpers, written once: the dialect's INSERT (for `ON CONFLICT`),
the chunked upsert, id chunks for IN lists and the alias lookups.

Every module of `storage.online` that writes or resolves goes through these, so the
chunk size (PostgreSQL caps a statement at 65535 binds) and the conflict rules cannot
drift apart between tables.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from nextbest.ingest.events import anonymous_of
from storage.online.models import ALIASES

CHUNK_ROWS = 5000
"""Rows per upsert statement and ids per IN list."""


def insert(dialect: sa.Connection | sa.Engine | str, table: sa.Table) -> Any:
    """The dialect's own INSERT (SQLite or PostgreSQL), which has `on_conflict_do_update`."""
    name = dialect if isinstance(dialect, str) else dialect.dialect.name
    return sqlite.insert(table) if name == "sqlite" else postgresql.insert(table)


def upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    update: Sequence[str] | None = None,
    where: Any = None,
) -> int:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE `update` (default: every other
    column) [WHERE `where`], in chunks; a key repeated in `rows` keeps its last row
    (PostgreSQL refuses to update a row twice in one statement). Returns rows sent."""
    if not rows:
        return 0
    keys = [c.name for c in table.primary_key.columns]
    unique = list({tuple(r[k] for k in keys): r for r in rows}.values())
    ins = insert(conn, table)
    columns = update if update is not None else [c.name for c in table.c if c.name not in keys]
    stmt = ins.on_conflict_do_update(
        index_elements=keys,
        set_={c: ins.excluded[c] for c in columns},
        where=where(ins.excluded) if callable(where) else where,
    )
    for start in range(0, len(unique), CHUNK_ROWS):
        conn.execute(stmt, unique[start : start + CHUNK_ROWS])
    return len(unique)


def id_chunks(ids: Iterable[str], size: int | None = None) -> list[list[str]]:
    """Distinct ids (first seen first) in IN-list sized pieces (`CHUNK_ROWS` by default)."""
    size = size or CHUNK_ROWS
    unique = list(dict.fromkeys(ids))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


def linked_users(conn: sa.Connection, anonymous_ids: Iterable[str]) -> dict[str, str]:
    """anonymous id -> the user an identify event linked it to (those linked only)."""
    out: dict[str, str] = {}
    for ids in id_chunks(anonymous_ids):
        stmt = sa.select(ALIASES.c.anonymous_id, ALIASES.c.user_id).where(
            ALIASES.c.anonymous_id.in_(ids)
        )
        out.update((a, u) for a, u in conn.execute(stmt) if u)
    return out


def anonymous_ids_of(conn: sa.Connection, user_id: str) -> list[str]:
    """The anonymous ids linked to `user_id`, sorted."""
    stmt = (
        sa.select(ALIASES.c.anonymous_id)
        .where(ALIASES.c.user_id == user_id)
        .order_by(ALIASES.c.anonymous_id)
    )
    return list(conn.execute(stmt).scalars())


def resolve_actor(conn: sa.Connection, actor: str) -> str:
    """`anon:<id>` -> the linked user id when an identify event linked them, else `actor`."""
    anonymous = anonymous_of(actor)
    if anonymous is None:
        return actor
    return linked_users(conn, [anonymous]).get(anonymous, actor)


SQL_ALIAS = f"SELECT user_id FROM {ALIASES.name} WHERE anonymous_id = ?"
"""`resolve_actor`'s query for a raw sqlite3 cursor (the decide hot path)."""


def resolve_actor_sqlite(cursor: Any, actor: str) -> str:
    """`resolve_actor` on a raw sqlite3 cursor, without SQLAlchemy's per-call cost."""
    anonymous = anonymous_of(actor)
    if anonymous is None:
        return actor
    row = cursor.execute(SQL_ALIAS, (anonymous,)).fetchone()
    return row[0] if row and row[0] else actor
