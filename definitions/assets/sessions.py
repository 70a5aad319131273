"""Silver: sessions per UTC day, a partitioned asset so any range of days backfills."""

import json
import warnings

import dagster as dg
import numpy as np
import pyarrow as pa

from definitions.assets.bronze import bronze_events
from definitions.batch.history import SESSIONS_TABLE, read_events, stitched_actors, ts_ms
from definitions.metadata import delta_definition, delta_metadata
from definitions.partitions import DAILY, IO_RETRY
from definitions.resources import NextbestResource

GAP_MS = 30 * 60 * 1000
"""Events without a session_id start a new session after 30 minutes of inactivity."""


def sessionize(actors: np.ndarray, session_ids: list[str | None], ts: np.ndarray) -> list[str]:
    """A session key per row (rows sorted by time): the client's session_id, else
    actor + start of an inactivity-gap session."""
    keys: list[str] = [""] * len(ts)
    last: dict[str, tuple[int, str]] = {}
    for i, (actor, sid, t) in enumerate(
        zip(actors.tolist(), session_ids, ts.tolist(), strict=True)
    ):
        if sid:
            keys[i] = sid
            continue
        prev = last.get(actor)
        if prev is None or t - prev[0] > GAP_MS:
            prev = (t, f"{actor}#{t}")
        last[actor] = (t, prev[1])
        keys[i] = prev[1]
    return keys


def _silver_sessions(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """Sessions of each day (Delta `silver/sessions`, partitioned by session_date): who,
    when, how many events and distinct items, and the count per event type. Identities
    are stitched; a session crossing midnight is split at the day boundary. The row
    count is the whole table's; `sessions` counts the days of this run."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    first, last = context.partition_key_range.start, context.partition_key_range.end
    columns = ["event_id", "type", "user_id", "anonymous_id", "item_id", "ts", "session_id"]
    base = store.pin(SESSIONS_TABLE)  # before bronze: an erasure in between fences
    events = read_events(
        store, columns=columns, filters=[("event_date", ">=", first), ("event_date", "<=", last)]
    )
    predicate = f"session_date >= '{first}' AND session_date <= '{last}'"
    if events.num_rows == 0:
        table_meta: dict = {}
        if store.exists(SESSIONS_TABLE):
            store.delete(SESSIONS_TABLE, predicate)
            table_meta = delta_metadata(store, SESSIONS_TABLE)
        return dg.MaterializeResult(metadata={**table_meta, "sessions": 0, "events": 0})
    actors = stitched_actors(spec, events)
    ts = ts_ms(events)
    keys = sessionize(actors, events.column("session_id").to_pylist(), ts)
    sessions: dict[str, dict] = {}
    for key, actor, kind, item, t in zip(
        keys, actors.tolist(), events.column("type").to_pylist(),
        events.column("item_id").to_pylist(), ts.tolist(), strict=True,
    ):  # fmt: skip
        s = sessions.setdefault(
            key, {"user_id": actor, "start": t, "end": t, "n": 0, "items": set(), "types": {}}
        )
        s["end"], s["n"] = t, s["n"] + 1
        if item:
            s["items"].add(item)
        s["types"][kind] = s["types"].get(kind, 0) + 1
    ts_type = pa.timestamp("ms", tz="UTC")
    rows = list(sessions.items())
    table = pa.table(
        {
            "session_id": [k for k, _ in rows],
            "user_id": [s["user_id"] for _, s in rows],
            "start_ts": pa.array([s["start"] for _, s in rows], pa.int64()).cast(ts_type),
            "end_ts": pa.array([s["end"] for _, s in rows], pa.int64()).cast(ts_type),
            "events": pa.array([s["n"] for _, s in rows], pa.int64()),
            "distinct_items": pa.array([len(s["items"]) for _, s in rows], pa.int64()),
            "event_types": [json.dumps(s["types"], sort_keys=True) for _, s in rows],
        }
    )
    dates = pa.compute.strftime(table.column("start_ts"), format="%Y-%m-%d")  # type: ignore[attr-defined]
    table = table.append_column("session_date", dates)
    if store.exists(SESSIONS_TABLE):
        written = store.write(
            SESSIONS_TABLE, table, mode="overwrite", predicate=predicate, based_on=base
        )
    else:
        written = store.write(
            SESSIONS_TABLE, table, mode="overwrite", partition_by=["session_date"], based_on=base
        )
    return dg.MaterializeResult(
        metadata={
            **delta_metadata(store, SESSIONS_TABLE, version=written),
            "sessions": table.num_rows,
            "events": events.num_rows,
            "days": f"{first}..{last}",
        }
    )


with warnings.catch_warnings():
    # backfill_policy is "beta" in Dagster 1.13; single-run range backfills are the point.
    warnings.simplefilter("ignore", dg.BetaWarning)
    silver_sessions = dg.asset(
        name="silver_sessions",
        deps=[bronze_events],
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="silver",
        kinds={"deltalake"},
        metadata=delta_definition(SESSIONS_TABLE),
        retry_policy=IO_RETRY,
    )(_silver_sessions)
