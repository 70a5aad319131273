"""One SQLAlchemy engine factory for the online store: SQLite embedded, PostgreSQL at scale.

SQLite transaction policy (why two BEGINs):
pysqlite's legacy transaction handling is switched off (`isolation_level = None`) and
SQLAlchemy's `begin` event emits BEGIN itself, the recipe in SQLAlchemy's SQLite dialect
docs ("Enabling Non-Legacy SQLite Transactional Modes"). Connections obtained through
`write_engine(engine)` emit `BEGIN IMMEDIATE`: the write lock is taken up front, so
a second writer (Dagster next to the stream) waits in `busy_timeout` instead of failing.
A deferred transaction that reads first and writes later cannot be rescued by
`busy_timeout`: if another writer committed after its snapshot, SQLite returns
SQLITE_BUSY ("database is locked") at once. Reads keep a plain deferred `BEGIN`: under
WAL they read a snapshot without taking any lock a writer needs, so API reads never
queue behind the stream writer. Always-IMMEDIATE would make every read wait for the
single write lock and serialise readers with the writer, throwing away what WAL buys.
"""

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

# Execution option that marks an engine/connection as a writer (see module docstring).
SQLITE_BEGIN_OPTION = "nextbest_sqlite_begin"
SQLITE_BUSY_TIMEOUT_S = 30.0


def create_online_engine(url: str, *, pool_size: int | None = None, echo: bool = False) -> Engine:
    """Engine for `sqlite:///path` (WAL, busy timeout, deferred reads / immediate writes)
    or `postgresql+psycopg://...` (bare `postgresql://` is mapped to psycopg)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, pool_size=pool_size, echo=echo)
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "echo": echo}
        if pool_size is not None:
            kwargs["pool_size"] = pool_size
        return sa.create_engine(parsed, **kwargs)
    raise ValueError(
        f"unsupported online store URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


def write_engine(engine: Engine) -> Engine:
    """The same engine (shared pool) whose transactions take SQLite's write lock at BEGIN.

    On PostgreSQL the option is ignored: row locks and MVCC already do the job.
    """
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_engine(url: URL, *, pool_size: int | None, echo: bool) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "echo": echo,
        # sqlite3's own busy handler; the PRAGMA below sets the same value explicitly.
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    }
    if pool_size is not None and not in_memory:
        kwargs["pool_size"] = pool_size
    engine = sa.create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take BEGIN away from pysqlite; `_on_begin` emits it (SQLAlchemy SQLite docs).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")

    return engine
