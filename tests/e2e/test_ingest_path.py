"""One ingest path (issue 14): the API, the importer and the stream turn the same input
event into the same bronze row, byte for byte, PII hashed exactly once."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from litestar.testing import TestClient

from definitions.batch.importer import import_events
from nextbest.ingest.validation import keyed_hash
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.records import parse_record
from serving.app import create_app
from storage.delta.schemas import events_to_table
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog

EVENT_COLUMNS = [
    "event_id", "type", "user_id", "anonymous_id", "item_id", "ts", "value",
    "session_id", "context", "properties", "event_date",
]  # fmt: skip
"""Bronze columns that come from the event (not where or when it was read)."""
EMAIL = "path-canary@example.com"


def _inputs(key: bytes) -> list[dict[str, Any]]:
    ts = "2025-01-06T08:00:00Z"
    return [
        {"event_id": "v1", "type": "view", "user_id": "u1", "item_id": "i1", "ts": ts,
         "context": {"session_id": "s1", "device": "mobile", "campaign": "x"}},
        {"event_id": "v2", "type": "view", "anonymous_id": "a1", "item_id": "i2",
         "ts": 1736150400.5},
        {"event_id": "r1", "type": "rate", "user_id": "u1", "item_id": "i1", "ts": ts, "value": 4},
        {"event_id": "id1", "type": "identify", "user_id": "u1", "anonymous_id": "a1", "ts": ts,
         "properties": {"email": EMAIL}},
        # already pseudonymized (a replay of the API's own output): kept as it is
        {"event_id": "id2", "type": "identify", "user_id": "u2", "anonymous_id": "a2", "ts": ts,
         "properties": {"email": keyed_hash(key, EMAIL)}},
    ]  # fmt: skip


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.select(EVENT_COLUMNS).to_pylist()
    return sorted(rows, key=lambda r: r["event_id"])


def _via_stream(settings: Settings, payloads: list[bytes]) -> list[dict[str, Any]]:
    """The stream's parse step, then the bronze rows its lake sink writes."""
    spec = load_spec(settings.spec)
    key = settings.pseudonymization_key.get_secret_value().encode()
    records = [parse_record((0, i, "k", p), spec, pii_key=key) for i, p in enumerate(payloads)]
    assert [r.kind for r in records] == ["event"] * len(payloads), records
    now = datetime.now(UTC)
    table = events_to_table(
        [r.body for r in records], partition=0, offsets=[r.offset for r in records], ingested_at=now
    )
    return _rows(table)


def test_api_importer_and_stream_write_identical_bronze_rows(
    settings: Settings, tmp_path: Path
) -> None:
    key = settings.pseudonymization_key.get_secret_value().encode()
    events = _inputs(key)

    # 1. the API: POST, then what the stream makes of the logged records
    app = create_app(settings, require_keys=False, rate_limit_per_s=None)
    with TestClient(app=app) as client:
        r = client.post("/v1/events", json={"events": events})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(events)
    with EventLog.open(settings.eventlog_dir, partitions=settings.partitions, mode="reader") as log:
        logged = [payload for p in range(settings.partitions) for _, _, payload in log.read(p, 0)]
    api = _via_stream(settings, logged)

    # 2. a producer writing straight to the log: the stream alone
    stream = _via_stream(settings, [json.dumps(e).encode() for e in events])

    # 3. the importer, straight to bronze
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = import_events(settings, load_spec(settings.spec), path, progress=False)
    assert summary.written == len(events), summary.lines()
    imported = _rows(DeltaStore.from_settings(settings).read("events"))

    assert len(api) == len(events)
    assert api == stream == imported
    hashed = keyed_hash(key, EMAIL)
    emails = [json.loads(r["properties"]).get("email") for r in api if r["type"] == "identify"]
    assert emails == [hashed, hashed]  # hashed once: the pre-hashed one was not hashed again
    assert not any(EMAIL in json.dumps(r, default=str) for r in api + stream + imported)
