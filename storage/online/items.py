"""Item attributes changed over HTTP (`PUT /v1/items`): the current values, shared by
every API process through the online store.

One row per item (`nb_item_attributes`): the attributes set over HTTP, merged (a
later update of `price` keeps an earlier `in_stock`), and `seq`, a catalogue-wide
change number. Writers take a table-wide lock first (SQLite's `BEGIN IMMEDIATE`,
PostgreSQL's advisory transaction lock), so `seq` values commit in increasing order
and a reader that remembers the highest `seq` it applied misses nothing when it
asks for `seq > last` (`changes_since`). The Delta `items` catalog stays the base
(`nextbest import items`); these rows are laid over it by each API process.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from storage.online.engine import is_sqlite, write_engine
from storage.online.models import now_ms
from storage.online.sql import id_chunks, upsert
from storage.online.store import OnlineStore

_WRITE_LOCK_KEY = 0x6E62_6974  # PostgreSQL advisory lock: one item writer at a time
_DDL_LOCK_KEY = 0x6E62_6F6E  # storage.online.store's: API processes starting together


class ItemAttributeTable(SQLModel, table=True):
    """The attributes of one item as last set over HTTP (a partial overlay)."""

    __tablename__ = "nb_item_attributes"  # pyright: ignore[reportAssignmentType]

    item_id: str = Field(primary_key=True, max_length=256)
    attributes: Any = Field(default=None, sa_type=sa.JSON(none_as_null=True), nullable=False)  # pyright: ignore[reportCallIssue]
    seq: int = Field(sa_type=sa.BigInteger, index=True)
    update_id: str = Field(max_length=64)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


ITEM_ATTRIBUTES = SQLModel.metadata.tables["nb_item_attributes"]


@dataclass(frozen=True, slots=True)
class ItemChanges:
    """Items changed after some `seq`, with their merged attributes; `seq` is the
    highest change number read (the next `changes_since` argument)."""

    items: dict[str, dict[str, Any]]
    seq: int


class ItemAttributeStore:
    def __init__(self, store: OnlineStore) -> None:
        self.engine = store.engine
        self._writer = write_engine(store.engine)

    def ensure_tables(self) -> None:
        with self._writer.begin() as conn:
            if not is_sqlite(self.engine):
                conn.execute(sa.text("select pg_advisory_xact_lock(:k)"), {"k": _DDL_LOCK_KEY})
            SQLModel.metadata.create_all(conn, tables=[ITEM_ATTRIBUTES])

    def upsert(self, updates: Mapping[str, Mapping[str, Any]], *, update_id: str) -> int:
        """Merge each item's attributes into its stored row in one transaction; returns
        the `seq` given to this change."""
        now = now_ms()
        with self._writer.begin() as conn:
            if not is_sqlite(self.engine):
                conn.execute(sa.text("select pg_advisory_xact_lock(:k)"), {"k": _WRITE_LOCK_KEY})
            seq = int(conn.execute(sa.select(sa.func.max(ITEM_ATTRIBUTES.c.seq))).scalar() or 0)
            seq += 1
            stored = _read(conn, list(updates))
            rows = [
                {
                    "item_id": item,
                    "attributes": {**stored.get(item, {}), **attrs},
                    "seq": seq,
                    "update_id": update_id,
                    "updated_at_ms": now,
                }
                for item, attrs in updates.items()
            ]
            upsert(conn, ITEM_ATTRIBUTES, rows)
        return seq

    def changes_since(self, seq: int) -> ItemChanges:
        t = ITEM_ATTRIBUTES.c
        stmt = sa.select(t.item_id, t.attributes, t.seq).where(t.seq > seq).order_by(t.seq)
        items: dict[str, dict[str, Any]] = {}
        top = seq
        with self.engine.connect() as conn:
            for item, attrs, row_seq in conn.execute(stmt):
                items[item] = dict(attrs or {})
                top = max(top, int(row_seq))
        return ItemChanges(items, top)

    def get_many(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return _read(conn, item_ids)


def _read(conn: sa.Connection, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ids in id_chunks(item_ids):
        stmt = sa.select(ITEM_ATTRIBUTES.c.item_id, ITEM_ATTRIBUTES.c.attributes).where(
            ITEM_ATTRIBUTES.c.item_id.in_(ids)
        )
        out.update((item, dict(attrs or {})) for item, attrs in conn.execute(stmt))
    return out
