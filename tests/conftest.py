"""Shared fixtures.

Server-backed tests (PostgreSQL, the Kafka-protocol broker) skip with a visible reason
on a laptop without the server, but fail under CI=true so CI never skips them silently.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextbest.settings import Settings

pytest_plugins = ["tests.broker"]

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "NEXTBEST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def require_server(reason: str) -> None:
    """Skip locally, fail under CI: a missing server in CI is a broken run, not a pass."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any connection failure means "no server here"
        admin.dispose()
        require_server(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {type(exc).__name__}")
        raise AssertionError("unreachable") from exc
    name = f"nextbest_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
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


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings on a temporary data home (nothing from the developer's env)."""
    return Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
