"""Consent across identify (spec privacy.consent): an identify event says a visitor and a
user are one person, so the side that never answered takes the other's answer; a
visitor follows the first user it was linked to, as the stream's stitch step does; and
the stream's consent step records inherited answers and re-reads the store."""

from nextbest.ingest.consent import ConsentChange, screen
from nextbest.ingest.events import Event
from nextbest.settings import Settings
from pipelines.consent import CACHE_TTL_S, StreamConsent
from pipelines.records import Record
from storage.online.consent import ConsentStore
from storage.online.store import OnlineStore
from tests.core.test_consent import KEY, Memory, consent_spec, ev


def test_a_visitors_grant_carries_over_when_they_log_in() -> None:
    spec = consent_spec(default="denied")
    grant = ev("consent", None, anonymous_id="a1", properties={"granted": True})
    batch = [
        grant,
        ev("view", None, anonymous_id="a1", item_id="i1"),
        ev("identify", "u1", anonymous_id="a1"),  # the person logs in
        ev("view", "u1", item_id="i2"),
        ev("view", None, anonymous_id="a1", item_id="i3"),
    ]
    out = screen(batch, spec, Memory(), KEY)
    assert out.dropped == [] and [i for i, _ in out.kept] == [0, 1, 2, 3, 4]
    assert out.changes == [
        ConsentChange("anon:a1", True, grant.ts_ms),
        ConsentChange("u1", True, grant.ts_ms),  # stored: u1's later batches are kept
    ]
    assert out.links == {"a1": "u1"}
    later = screen([ev("view", "u1", item_id="i4")], spec, Memory({"u1": True}), KEY)
    assert later.dropped == []


def test_a_users_answer_reaches_the_visitor_it_links() -> None:
    spec = consent_spec(default="denied")
    out = screen([ev("identify", "u1", anonymous_id="a1")], spec, Memory({"u1": True}), KEY)
    assert out.dropped == [] and out.links == {"a1": "u1"}
    assert out.changes == [ConsentChange("anon:a1", True, 0)]
    # The next request, before the stream stored the link: the copied answer keeps it.
    store = Memory({"u1": True, "anon:a1": True})
    assert screen([ev("view", None, anonymous_id="a1", item_id="i1")], spec, store, KEY).kept


def test_a_visitors_refusal_follows_them_into_their_account() -> None:
    spec = consent_spec(default="granted")
    refusal = ev("consent", None, anonymous_id="a2", properties={"granted": False})
    batch = [refusal, ev("identify", "u2", anonymous_id="a2"), ev("view", "u2", item_id="i1")]
    out = screen(batch, spec, Memory(), KEY)
    assert out.dropped == [1, 2] and out.links == {}  # not linked: the identify is not kept
    assert out.changes[-1] == ConsentChange("u2", False, refusal.ts_ms)


def test_the_first_link_wins() -> None:
    """a1 was linked to u1 (revoked): the stream routes a1's events to u1 whatever later
    identify events say, so they are judged by u1, and nothing is copied or relinked."""
    spec = consent_spec(default="denied")
    store = Memory({"u1": False, "u2": True}, links={"a1": "u1"})
    batch = [
        ev("identify", "u2", anonymous_id="a1"),  # routed to u2, who consents: kept
        ev("view", None, anonymous_id="a1", item_id="i1"),
    ]
    out = screen(batch, spec, store, KEY)
    assert [i for i, _ in out.kept] == [0] and out.dropped == [1]
    assert out.changes == [] and out.links == {}
    # Within one batch too: the first identify links, the second does not.
    fresh = Memory({"u1": True, "u2": False})
    batch = [
        ev("identify", "u1", anonymous_id="a3"),
        ev("identify", "u2", anonymous_id="a3"),
        ev("view", None, anonymous_id="a3", item_id="i1"),
    ]
    out = screen(batch, spec, fresh, KEY)
    assert out.links == {"a3": "u1"} and out.dropped == [1]  # the view follows u1
    assert out.changes == [ConsentChange("anon:a3", True, 0)]


def test_the_stream_records_inherited_answers_and_rereads_the_store(
    settings: Settings,
) -> None:
    spec = consent_spec(default="denied")
    online = OnlineStore.from_settings(settings)
    store = ConsentStore(online.engine)
    step = StreamConsent(settings, spec, KEY)
    now = [0.0]
    step.cache.clock = lambda: now[0]

    def passes(event: Event) -> bool:
        return step(Record("event", 0, 0, event)) is not None

    try:
        store.record([ConsentChange("u5", True, 1)])
        # A producer's identify (unmarked): u5 consents, a5 never answered.
        assert passes(ev("identify", "u5", anonymous_id="a5"))
        assert store.get("anon:a5") == ConsentChange("anon:a5", True, 1)
        assert passes(ev("view", None, anonymous_id="a5", item_id="i1"))
        # Another process records a revoke: seen once the cached answer expires.
        store.record([ConsentChange("u5", False, 2), ConsentChange("anon:a5", False, 2)])
        assert passes(ev("view", "u5", item_id="i1"))  # still the cached grant
        now[0] += CACHE_TTL_S + 1
        assert not passes(ev("view", "u5", item_id="i1"))
        assert not passes(ev("view", None, anonymous_id="a5", item_id="i1"))
    finally:
        step.cache.store.engine.dispose()
        online.dispose()
