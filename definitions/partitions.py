"""Day partitions of the history assets, so a range of days can be backfilled.

Keyed by the UTC event date (the `event_date` partition column of bronze). They start
at the data's first day, read from the bronze Delta log (partition values of its files,
no data file opened) when the code location loads: a reload picks up older imported
history. One run can cover a whole range (`BackfillPolicy.single_run`).
"""

import logging
from datetime import UTC, date, datetime

import dagster as dg
from deltalake import DeltaTable

from nextbest.settings import Settings
from storage.delta.store import DeltaStore

log = logging.getLogger(__name__)

DAILY = dg.DailyPartitionsDefinition(start_date="1995-01-01", end_offset=1)
"""The placeholder the day-partitioned assets are declared with; `build_definitions`
swaps in `history_partitions` (early enough for e.g. MovieLens 100k, 1997-1998)."""

IO_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)
"""Retries for steps that hit storage: transient object-store or lock errors pass."""


def daily_from(start: str) -> dg.DailyPartitionsDefinition:
    """UTC days from `start` (YYYY-MM-DD) up to and including today."""
    return dg.DailyPartitionsDefinition(start_date=start, end_offset=1)


def first_event_day(settings: Settings) -> str | None:
    """The earliest `event_date` in bronze from the Delta log alone; None when empty."""
    store = DeltaStore.from_settings(settings)
    if not store.exists("events"):
        return None
    table = DeltaTable(store.uri("events"), storage_options=store.storage_options)
    days = [p["event_date"] for p in table.partitions() if p.get("event_date")]
    return min(days) if days else None


def history_partitions(
    settings: Settings, *, today: date | None = None
) -> dg.DailyPartitionsDefinition:
    """Days from bronze's first event day (today when bronze is empty or unreadable)."""
    today = today or datetime.now(UTC).date()
    try:
        first = first_event_day(settings)
    except Exception as exc:  # an unreachable object store must not break the location
        log.warning("history start unknown (%s); day partitions start today", exc)
        first = None
    start = first if first is not None and first <= today.isoformat() else today.isoformat()
    return daily_from(start)


def with_partitions(
    asset: dg.AssetsDefinition, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    """`asset` with its day partitions replaced (same node, same deps)."""
    return asset.map_asset_specs(lambda s: s.replace_attributes(partitions_def=partitions))
