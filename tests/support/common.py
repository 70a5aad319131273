"""Paths and server checks shared by fixtures and tests.

Server-backed tests (PostgreSQL, the Kafka-protocol broker) skip with a visible reason
on a laptop without the server, but fail under CI=true so CI never skips them silently.
"""

import os
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
