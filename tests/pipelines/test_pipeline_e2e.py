"""End to end through the real stores: embedded log -> Bytewax flow -> Delta, the
online store and LanceDB; then a replay of the same log must change nothing."""

import json

from bytewax.testing import run_main

from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.flow import build_flow
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.store import OnlineStore
from storage.vectors import VectorStore
from tests.support.stream_helpers import (
    append_log,
    delta_events,
    demo_events,
    online_mismatches,
    write_catalog,
)


def _run_bounded(settings: Settings, spec: Spec) -> None:
    run_main(build_flow(settings, spec, tail=False))


def test_thousand_events_reach_every_store_once(settings: Settings, spec: Spec) -> None:
    cfg, events = demo_events(1000)
    items = write_catalog(settings, spec, cfg, vectors=True)
    assert append_log(settings, events) == 1000
    # A record no producer should send: it must become a dead letter, not a crash.
    with EventLog.from_settings(settings, mode="writer") as log:
        log.append([("u-bad", b"{not json"), ("u-bad", json.dumps({"type": "view"}).encode())])

    _run_bounded(settings, spec)

    delta = DeltaStore.from_settings(settings)
    stored, table = delta_events(settings)
    ids = table.column("event_id").to_pylist()
    assert len(ids) == 1000 == len(set(ids))
    assert set(ids) == {e["event_id"] for e in events}
    assert delta.count("dead_letters") == 2
    # Bronze keeps each event's source position.
    positions = set(
        zip(
            table.column("source_partition").to_pylist(),
            table.column("source_offset").to_pylist(),
            strict=True,
        )
    )
    assert len(positions) == 1000

    assert online_mismatches(settings, spec, stored, items) == []

    online = OnlineStore.from_settings(settings)
    users = {e["user_id"] for e in events if e["user_id"]}
    states = online.get_states(sorted(users))
    assert set(states) == users
    some = next(iter(states.values()))
    assert some.session.history and some.event_ts_ms > 0 and some.updated_at_ms
    features = online.get_features_many(sorted(users))
    assert all(r.event_ts_ms > 0 and r.updated_at_ms for rows in features.values() for r in rows)
    # identify events linked anonymous visitors to their users.
    linked = {(e["anonymous_id"], e["user_id"]) for e in events if e["type"] == "identify"}
    assert linked
    for anonymous_id, user_id in linked:
        assert online.resolve(anonymous_id) == user_id
    online.dispose()

    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    vectors = VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]
    with_vector = vectors.get_user_vectors(sorted(users))
    assert len(with_vector) == len(users)
    assert all(v.shape == (spec.model.dim,) for v in with_vector.values())

    # Replay the whole log (fresh flow state, same stores): nothing changes.
    before = {name: delta.count(name) for name in ("events", "dead_letters")}
    users_before = vectors.count("users")
    _run_bounded(settings, spec)
    assert {name: delta.count(name) for name in ("events", "dead_letters")} == before
    assert vectors.count("users") == users_before
    assert online_mismatches(settings, spec, stored, items) == []


def test_resumes_from_recovery_without_reprocessing(settings: Settings, spec: Spec) -> None:
    """A bounded run with recovery, more events, another run: only the new ones are read."""
    from bytewax.recovery import RecoveryConfig

    from pipelines.run import ensure_recovery_dir

    cfg, events = demo_events(600, seed=11)
    items = write_catalog(settings, spec, cfg, vectors=False)
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    ensure_recovery_dir(settings.recovery_dir)  # idempotent

    first, second = events[:300], events[300:]
    append_log(settings, first)
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)
    online = OnlineStore.from_settings(settings)
    # Users whose events are all in the first half: the resumed run must not touch them.
    late = {e["user_id"] for e in second}
    idle = sorted({e["user_id"] for e in first if e["user_id"]} - late)
    assert idle
    written = {
        u: max(r.updated_at_ms or 0 for r in rows)
        for u, rows in online.get_features_many(idle).items()
    }

    append_log(settings, second)
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)

    stored, table = delta_events(settings)
    assert table.num_rows == 600 == len(set(table.column("event_id").to_pylist()))
    assert online_mismatches(settings, spec, stored, items) == []
    again = {
        u: max(r.updated_at_ms or 0 for r in rows)
        for u, rows in online.get_features_many(idle).items()
    }
    assert again == written
    online.dispose()
