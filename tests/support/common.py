"""Paths and server checks shared by fixtures and tests.

Server-backed tests (PostgreSQL, the Kafka-protocol broker) skip with a visible reason
on a laptop without the server, but fail under CI=true so CI never skips them silently.
"""

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get(
    "NEXTBEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def require_server(reason: str) -> None:
    """Skip locally, fail under CI: a missing server in CI is a broken run, not a pass."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_database(prefix: str = "nextbest_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards): its URL. Skips locally,
    fails under CI, when no PostgreSQL answers."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any connection failure means "no server here"
        admin.dispose()
        require_server(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {type(exc).__name__}")
        raise AssertionError("unreachable") from exc
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "select pg_terminate_backend(pid) from pg_stat_activity "
                    "where datname = :n and pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'drop database if exists "{name}"'))
        admin.dispose()
