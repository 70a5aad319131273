"""A record nested 3,000 deep, written straight to the log past the API (which refuses
such a body with a 400): the real stream process (`python -m pipelines`) must turn it
into a dead letter and go on applying what follows. Apart from tests/e2e/test_hostile.py
because a stopped stream there would hide every other verdict of that run."""

import json
import time

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.store import OnlineStore
from tests.support.hostile_cases import DEEP_RECORDS
from tests.support.stream_helpers import demo_events, start_stream, write_catalog
from tests.support.waiting import wait_until


def test_a_record_nested_3000_deep_is_a_dead_letter_and_the_stream_goes_on(
    settings: Settings,
) -> None:
    spec = load_spec(settings.spec)
    cfg, _ = demo_events(10)
    write_catalog(settings, spec, cfg, vectors=False)
    canary = {"type": "view", "user_id": "canary", "item_id": "i00001", "ts": time.time()}
    with EventLog.from_settings(settings, mode="writer") as log:
        log.append([("poison", raw) for raw in DEEP_RECORDS])
        log.append([("canary", json.dumps(canary).encode())])
    proc = start_stream(settings)
    online = OnlineStore.from_settings(settings)
    delta = DeltaStore.from_settings(settings)

    def alive() -> None:
        log = (settings.home_dir / "logs" / "stream.log").read_text(errors="replace")
        assert proc.poll() is None, log[-800:]

    def dead_letters() -> list[bytes]:
        if not delta.exists("dead_letters"):
            return []
        return delta.read("dead_letters", columns=["raw"]).column("raw").to_pylist()

    try:

        def applied() -> bool:
            alive()
            views = any(r.feature == "views_1h" for r in online.get_features("canary"))
            return views and len(dead_letters()) == len(DEEP_RECORDS)

        wait_until(applied, timeout=30, what="the canary and the dead letters")
    finally:
        online.dispose()
        proc.kill()
        proc.wait(timeout=20)
    assert sorted(dead_letters()) == sorted(DEEP_RECORDS)
