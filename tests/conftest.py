"""Shared fixtures (helpers live in tests/support/)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from tests.support.common import ROOT, fresh_database

pytest_plugins = ["tests.support.broker"]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings on a temporary data home (nothing from the developer's env)."""
    return Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def spec() -> Spec:
    """The repository's nextbest.yaml (the spec `settings` points at); frozen, so shared."""
    return load_spec(ROOT / "nextbest.yaml")
