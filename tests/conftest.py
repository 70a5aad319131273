"""Shared fixtures (helpers live in tests/support/)."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from tests.support.common import PG_ADMIN_URL, ROOT, require_server

pytest_plugins = ["tests.support.broker"]


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


@pytest.fixture(scope="session")
def spec() -> Spec:
    """The repository's nextbest.yaml (the spec `settings` points at); frozen, so shared."""
    return load_spec(ROOT / "nextbest.yaml")
