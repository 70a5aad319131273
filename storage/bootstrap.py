"""Create the data home and every store for a spec, idempotently (`nextbest init`).

Each component also creates what it needs on first use; this exists so a newcomer
(and `nextbest up`) gets the layout of docs/architecture.md#data-home in one step, one line per
store saying where it lives.
"""

from collections.abc import Iterator
from pathlib import Path

from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.kafka_topic import ensure_topic
from storage.online.store import OnlineStore
from storage.vectors import VectorStore


def item_attribute_types(spec: Spec) -> dict[str, str]:
    """The spec's item attributes as vector-store column types."""
    return {name: attr.type for name, attr in spec.entities.item.attributes.items()}


def init_stores(settings: Settings, spec: Spec) -> Iterator[str]:
    home = settings.home_dir
    for folder in (home, settings.recovery_dir, settings.dagster_home):
        folder.mkdir(parents=True, exist_ok=True)
    yield f"data home    {home}"

    DeltaStore.from_settings(settings).ensure_tables()
    yield f"delta        {settings.delta_root}"

    online = OnlineStore.from_settings(settings)
    online.dispose()
    yield f"online store {_redact(settings.online_database_url)}"

    vectors = VectorStore.from_settings(
        settings,
        dim=spec.model.dim,
        item_attributes=item_attribute_types(spec),  # type: ignore[arg-type]
    )
    vectors.ensure_tables()
    yield f"vectors      {settings.lance_root}"

    models = settings.models_root
    if "://" not in models:  # an object-store prefix needs no folder
        Path(models).mkdir(parents=True, exist_ok=True)
    yield f"models       {models}"

    if settings.kafka_bootstrap:
        state = ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, settings.partitions)
        verb = "created" if state.created else "exists"
        yield (
            f"event log    kafka {settings.kafka_bootstrap} topic {state.topic}"
            f" ({state.partitions} partitions, {verb})"
        )
    else:
        EventLog.from_settings(settings, mode="reader").close()
        yield f"event log    {settings.eventlog_dir} ({settings.partitions} partitions)"


def _redact(url: str) -> str:
    """Never print a password that sits in a database URL."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
