"""A stream that cannot be poisoned (issue #12): records that cannot be kept become
dead letters with a reason and the stream goes on, through the real Bytewax flow,
Delta, and the online store (SQLite, and PostgreSQL for the id limits)."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from pipelines.flow import build_flow
from pipelines.run import ensure_recovery_dir
from storage.delta.store import DeltaStore
from storage.online.status import read_status
from storage.online.store import OnlineStore
from tests.support.stream_helpers import append_log, demo_events, write_catalog

ROOT = Path(__file__).resolve().parents[2]


def _event(n: int, type_: str, user: str, item: str | None = "i-1", **over: Any) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(minutes=10) + timedelta(seconds=n)
    event: dict[str, Any] = {"event_id": f"e-{n}", "type": type_, "user_id": user}
    event["ts"] = ts.isoformat()
    if item is not None:
        event["item_id"] = item
    if type_ == "rate":
        event["value"] = 4.0
    return {**event, **over}


def _run(settings: Settings, spec: Spec) -> None:
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)


def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    delta = DeltaStore.from_settings(settings)
    if not delta.exists("dead_letters"):
        return []
    return delta.read("dead_letters").to_pylist()


def _features(settings: Settings, actor: str) -> dict[tuple[str, str], float | None]:
    store = OnlineStore.from_settings(settings)
    try:
        return {(r.feature, r.group_key): r.value for r in store.get_features(actor)}
    finally:
        store.dispose()


def _prepare(settings: Settings, spec: Spec) -> None:
    cfg, _ = demo_events(10)
    write_catalog(settings, spec, cfg, vectors=False)


def test_overflowing_values_are_dead_letters_and_the_stream_goes_on(
    settings: Settings, spec: Spec
) -> None:
    """Two `rate` events of 1.7e308 for one user killed the worker with an OverflowError
    in fsum, on every replay. Now they are dead letters and a canary after them lands."""
    _prepare(settings, spec)
    poison = [_event(i, "rate", "u-poison", value=1.7e308) for i in (1, 2)]
    append_log(settings, [*poison, _event(3, "rate", "u-poison"), _event(4, "view", "u-canary")])
    _run(settings, spec)

    assert _features(settings, "u-canary")[("views_1h", "")] == 1.0
    assert _features(settings, "u-poison")[("mean_rating_30d", "")] == 4.0
    dead = _dead_letters(settings)
    assert sorted(json.loads(d["raw"])["event_id"] for d in dead) == ["e-1", "e-2"]
    assert all("value" in d["error"] and "1.7e+308" in d["error"] for d in dead)

    # A restart on the same recovery directory replays nothing poisonous and adds nothing.
    append_log(settings, [_event(5, "view", "u-canary")])
    _run(settings, spec)
    assert _features(settings, "u-canary")[("views_1h", "")] == 2.0
    assert len(_dead_letters(settings)) == 2
    online = OnlineStore.from_settings(settings)
    status = read_status(online.engine)
    online.dispose()
    assert sum(s.dead_letters for s in status.values()) == 2
    assert sum(s.next_offset for s in status.values()) == 5  # every record read


def test_a_record_failing_in_a_state_step_is_a_dead_letter(settings: Settings, spec: Spec) -> None:
    """Whatever raises while folding one record costs that record only: here the item
    lookup fails for one item, inside the user and item state steps."""
    from pipelines.catalog import StoreCatalog

    _prepare(settings, spec)

    class Failing(StoreCatalog):
        def item(self, item_id: str) -> Any:
            if item_id == "i-bad":
                raise RuntimeError("catalog exploded")
            return super().item(item_id)

    append_log(
        settings,
        [_event(1, "view", "u-a", "i-bad"), _event(2, "view", "u-a"), _event(3, "view", "u-b")],
    )
    run_main(build_flow(settings, spec, tail=False, catalog=Failing(settings, spec)))
    assert _features(settings, "u-a")[("views_1h", "")] == 1.0
    assert _features(settings, "u-b")[("views_1h", "")] == 1.0
    dead = _dead_letters(settings)
    assert {d["source"] for d in dead} == {"stream:state_user", "stream:state_item"}
    assert all("catalog exploded" in d["error"] and d["source_offset"] is not None for d in dead)


def test_a_future_dated_record_does_not_take_over_trending(settings: Settings, spec: Spec) -> None:
    """A record dated 9999 written straight to the log (past the API) used to anchor its
    item's window forever; now it is a dead letter and later real views count."""
    _prepare(settings, spec)
    future = _event(1, "view", "u-f", "i-future", ts="9999-01-01T00:00:00Z")
    append_log(settings, [future, _event(2, "view", "u-f", "i-real"), _event(3, "view", "u-f")])
    _run(settings, spec)
    assert _features(settings, "item:i-future") == {}
    assert _features(settings, "item:i-real")[("item_views_1h", "")] == 1.0
    assert _features(settings, "u-f")[("views_1h", "")] == 2.0  # the user's windows move
    [dead] = _dead_letters(settings)
    assert "ahead of the stream clock" in dead["error"]


@pytest.mark.postgres
def test_long_and_nul_ids_do_not_stop_the_stream_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """A 254-character id overflowed VARCHAR(256) once prefixed (`item:`, `anon:`), an id
    with a NUL byte was refused by the driver: either stopped the worker."""
    home, spec_path = tmp_path / "home", ROOT / "nextbest.yaml"
    settings = Settings(home=home, spec=spec_path, online_url=pg_url, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    _prepare(settings, spec)
    long_id = "x" * 254
    events = [
        _event(1, "view", "u-long", long_id),
        _event(2, "view", "u\x00nul"),
        {**_event(3, "view", "u-anon"), "user_id": None, "anonymous_id": long_id},
        _event(4, "view", "u-canary"),
    ]
    append_log(settings, events)
    _run(settings, spec)
    assert _features(settings, "u-canary")[("views_1h", "")] == 1.0
    errors = sorted(d["error"] for d in _dead_letters(settings))
    assert len(errors) == 3
    assert sum("characters, at most 251" in e for e in errors) == 2
    assert sum("NUL" in e for e in errors) == 1


def _latest_snaps(settings: Settings, step: str) -> dict[str, bytes | None]:
    """state key -> its newest snapshot in Bytewax's recovery files (None: discarded)."""
    import sqlite3

    out: dict[str, tuple[int, bytes | None]] = {}
    for path in settings.recovery_dir.glob("part-*.sqlite3"):
        with sqlite3.connect(path) as db:
            rows = db.execute(
                "select state_key, snap_epoch, ser_change from snaps where step_id like ?",
                (f"%.{step}",),
            ).fetchall()
        for key, epoch, snap in rows:
            if key not in out or epoch > out[key][0]:
                out[key] = (epoch, snap)
    return {k: v[1] for k, v in out.items()}


def test_idle_actors_state_is_evicted_after_the_spec_ttl(tmp_path: Path) -> None:
    """With `state: {ttl: ...}`, an actor whose newest event is older than the ttl (never
    shorter than the longest window, 30d here) loses its stream state and snapshot; a
    recent one keeps it."""
    from pipelines.flow import state_key

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text((ROOT / "nextbest.yaml").read_text() + "\nstate:\n  ttl: 1d\n")
    settings = Settings(home=tmp_path / "home", spec=spec_path, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(spec_path)
    assert spec.state.ttl == "1d"
    _prepare(settings, spec)
    old = _event(1, "view", "u-old", ts=(datetime.now(UTC) - timedelta(days=40)).isoformat())
    append_log(settings, [old, _event(2, "view", "u-new")])
    _run(settings, spec)
    append_log(settings, [_event(3, "view", "u-later")])  # the next run wakes due keys
    _run(settings, spec)

    key = settings.pseudonymization_key.get_secret_value().encode()
    snaps = _latest_snaps(settings, "state_user")
    assert snaps[state_key(key, "u-new")] is not None
    assert snaps[state_key(key, "u-later")] is not None
    gone = state_key(key, "u-old")
    assert gone in snaps and snaps[gone] is None  # snapshotted once, then a tombstone
    items = _latest_snaps(settings, "state_item")
    assert items["i-1"] is not None  # viewed recently (by u-new)


def test_a_row_the_lake_sink_cannot_convert_is_a_dead_letter(settings: Settings) -> None:
    """A record that fails its Arrow conversion (here a feedback row whose ts is not a
    datetime) used to fail the sink's writer thread and with it the worker: now it is a
    dead letter and the other rows of its batch are appended."""
    from pipelines.records import Record
    from pipelines.sinks import LakeSink

    def feedback(offset: int, ts: Any) -> Record:
        row = {"decision_id": f"d{offset}", "user_id": "u", "outcome": "click", "ts": ts}
        return Record("feedback", 1, offset, {**row, "action_id": "a", "item_id": None})

    part = LakeSink(settings, parts=1).build_part("lake", "lake000", None)
    now = datetime.now(UTC)
    part.write_batch([feedback(0, now), feedback(1, "not a datetime"), feedback(2, now)])
    part.close()
    delta = DeltaStore.from_settings(settings)
    assert sorted(delta.read("feedback").column("decision_id").to_pylist()) == ["d0", "d2"]
    [dead] = _dead_letters(settings)
    assert dead["source"] == "stream:sink_lake" and dead["source_offset"] == 1
    assert "ts must be a datetime" in dead["error"]


@pytest.mark.postgres
def test_rows_postgres_refuses_are_skipped_not_fatal(tmp_path: Path, pg_url: str) -> None:
    """An item attribute the online store cannot hold as a group key (300 characters,
    over VARCHAR(256)) failed the whole online write and stopped the worker; now the
    sink writes update by update and skips (logs) the refused one."""
    import pyarrow as pa

    home, spec_path = tmp_path / "home", ROOT / "nextbest.yaml"
    settings = Settings(home=home, spec=spec_path, online_url=pg_url, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    _prepare(settings, spec)
    delta = DeltaStore.from_settings(settings)
    rows = delta.read("items").to_pylist()
    rows[0]["category"] = "c" * 300
    delta.write("items", pa.Table.from_pylist(rows), mode="overwrite")
    weird, normal = rows[0]["item_id"], rows[1]["item_id"]
    append_log(settings, [_event(1, "view", "u-weird", weird), _event(2, "view", "u-ok", normal)])
    _run(settings, spec)
    assert _features(settings, "u-ok")[("views_1h", "")] == 1.0
    assert _features(settings, "u-weird") == {}
