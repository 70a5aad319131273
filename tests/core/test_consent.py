"""Consent per user (spec privacy.consent): the spec section, the shared rules (a batch
judged in order, aggregate-only events without the person) and the consent table with
its cache, on SQLite and PostgreSQL. `test_consent_http.py` runs the API and stream."""

from pathlib import Path
from typing import Any

import pytest

from nextbest.ingest.consent import (
    MARK,
    NO_CONSENT_PREFIX,
    ConsentChange,
    is_anonymized,
    judged,
    screen,
)
from nextbest.ingest.events import Event
from nextbest.ingest.validation import EventRejected, validate_batch, validate_event
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec, parse_spec
from nextbest.spec.models import Spec
from storage.online.consent import ConsentCache, ConsentStore
from storage.online.store import OnlineStore

ROOT = Path(__file__).resolve().parents[2]
KEY = b"test-key"
CONSENT_EVENT = """  consent:
    entity: null
    weight: 0.0
    properties:
      granted: {type: bool, required: true}
"""


def consent_spec_text(default: str = "denied", mode: str = "drop") -> str:
    """The demo spec plus a consent event type and a privacy section."""
    text = (ROOT / "nextbest.yaml").read_text()
    assert text.count("\nevents:\n") == 1
    text = text.replace("\nevents:\n", "\nevents:\n" + CONSENT_EVENT)
    return (
        text
        + f"\nprivacy:\n  consent:\n    event: consent\n    default: {default}\n"
        + (f"    without_consent: {mode}\n")
    )


def consent_spec(**kw: str) -> Spec:
    spec, problems = parse_spec(consent_spec_text(**kw))
    assert spec is not None, [str(p) for p in problems]
    return spec


def ev(kind: str, user: str | None = None, **kw: Any) -> Event:
    return Event.model_validate({"type": kind, "user_id": user, "ts": 1_736_150_400, **kw})


class Memory:
    """A `ConsentState` from plain dicts."""

    def __init__(self, rows: dict[str, bool] | None = None, links: dict[str, str] | None = None):
        self.rows = {s: ConsentChange(s, g, 0) for s, g in (rows or {}).items()}
        self.links = links or {}

    def stored(self, subject: str) -> ConsentChange | None:
        return self.rows.get(subject)

    def linked_user(self, anonymous_id: str) -> str | None:
        return self.links.get(anonymous_id)


# --- spec and rules ------------------------------------------------------------------


def test_privacy_section_loads_with_defaults() -> None:
    consent = consent_spec().privacy.consent
    assert consent is not None
    assert (consent.event, consent.property, consent.default) == ("consent", "granted", "denied")
    assert consent.without_consent == "drop"
    assert load_spec(ROOT / "nextbest.yaml").privacy.consent is None  # optional section


def test_consent_event_needs_its_boolean() -> None:
    spec = consent_spec()
    assert validate_event(
        {"type": "consent", "user_id": "u", "ts": 1, "properties": {"granted": False}}, spec
    )
    for props in ({}, {"granted": "yes"}, {"granted": None}):
        with pytest.raises(EventRejected, match="'granted'"):
            validate_event({"type": "consent", "user_id": "u", "ts": 1, "properties": props}, spec)


def test_a_batch_is_judged_in_order() -> None:
    spec = consent_spec()
    grant = ev("consent", "u1", ts=1_736_150_500, properties={"granted": True})
    batch = [
        ev("view", "u1", item_id="i1"),  # before the grant: dropped
        grant,
        ev("view", "u1", item_id="i2"),
        ev("view", None, anonymous_id="a1", item_id="i3"),  # unlinked visitor: default
        ev("identify", "u1", anonymous_id="a1"),
        ev("view", None, anonymous_id="a1", item_id="i4"),  # now follows u1
        ev("view", "u2", item_id="i5"),  # u2 revoked earlier
    ]
    out = screen(batch, spec, Memory({"u2": False}), KEY)
    assert out.dropped == [0, 3, 6]
    assert [i for i, _ in out.kept] == [1, 2, 4, 5]
    # The identify links a1 to u1, and a1 (no answer of its own) takes u1's.
    assert out.changes == [
        ConsentChange("u1", True, grant.ts_ms),
        ConsentChange("anon:a1", True, grant.ts_ms),
    ]
    assert out.links == {"a1": "u1"}
    kept = dict(out.kept)
    assert kept[1] == grant  # the record of the choice is stored as sent
    assert all(judged(kept[i], KEY) for i in (2, 4, 5))
    assert all((kept[i].context.model_extra or {})[MARK].startswith("granted:") for i in (2, 4, 5))


def test_older_consent_event_does_not_override_a_newer_one() -> None:
    spec = consent_spec()
    state = Memory()
    state.rows["u1"] = ConsentChange("u1", False, 2_000_000_000_000)
    old = ev("consent", "u1", properties={"granted": True})
    out = screen([old, ev("view", "u1", item_id="i1")], spec, state, KEY)
    assert out.dropped == [1]


def test_aggregate_keeps_item_events_without_the_person() -> None:
    spec = consent_spec(mode="aggregate")
    view = ev(
        "view",
        "u9",
        event_id="e-u9-1",
        item_id="i7",
        context={"session_id": "s-u9", "device": "mobile", "note": "u9"},
        properties={"referrer": "search"},
    )
    ident = ev("identify", "u9", anonymous_id="a9", properties={"email": "u9@example.com"})
    out = screen([view, ident], spec, Memory(), KEY)
    assert out.aggregated == [0] and out.dropped == [1]  # identify carries no item
    (_, stored), again = out.kept[0], screen([view], spec, Memory(), KEY).kept[0][1]
    assert is_anonymized(stored, KEY) and stored == again  # deterministic: retries deduplicate
    assert not is_anonymized(stored, b"another-key")
    assert stored.user_id is None and (stored.anonymous_id or "").startswith(NO_CONSENT_PREFIX)
    assert stored.item_id == "i7" and stored.type == "view" and stored.ts == view.ts
    assert "u9" not in stored.to_json().decode()
    assert stored.context.session_id is None and stored.context.device == "mobile"
    # Passing through again (the stream) changes nothing.
    assert screen([stored], spec, Memory(), KEY).kept == [(0, stored)]


def test_marks_cannot_be_forged() -> None:
    """A client's `~nc:` id is rejected at ingest; a producer's `~nc:` id or consent mark
    (written straight to Kafka) is not trusted: the event is judged like any other."""
    spec = consent_spec(default="denied", mode="drop")
    raws = [
        {"type": "view", "anonymous_id": "~nc:cookie-42", "item_id": "i1", "ts": 1},
        {"type": "view", "user_id": "~nc:u", "item_id": "i1", "ts": 1},
        {"type": "view", "anonymous_id": "a-ok", "item_id": "i1", "ts": 1},
    ]
    accepted, rejected = validate_batch(raws, spec, key=KEY)
    assert [r.index for r in rejected] == [0, 1] and "reserved" in rejected[0].reason
    assert [e.anonymous_id for e in accepted] == ["a-ok"]

    forged_anon = ev("view", None, anonymous_id="~nc:cookie-42", item_id="i1")
    forged_mark = ev("view", "u9", item_id="i1", context={MARK: "granted"})
    copied_mark = ev("view", "u9", item_id="i1", context={MARK: "granted:" + "0" * 32})
    for event in (forged_anon, forged_mark, copied_mark):
        assert not judged(event, KEY) and not is_anonymized(event, KEY)
    out = screen([forged_anon, forged_mark, copied_mark], spec, Memory(), KEY)
    assert out.dropped == [0, 1, 2]
    # What the API marks passes the stream's check, with the same key only.
    granted = screen([ev("view", "u1", item_id="i1")], spec, Memory({"u1": True}), KEY)
    marked = granted.kept[0][1]
    assert judged(marked, KEY) and not judged(marked, b"another-key")
    moved = marked.model_copy(update={"event_id": "another-event"})
    assert not judged(moved, KEY)  # a mark is bound to its event id


# --- the consent table -----------------------------------------------------------------


def _newest_wins(store: ConsentStore) -> None:
    assert store.record([ConsentChange("u1", True, 10), ConsentChange("u1", False, 5)]) == 1
    assert store.get("u1") == ConsentChange("u1", True, 10)
    store.record([ConsentChange("u1", False, 9)])  # older: ignored
    assert store.get("u1") == ConsentChange("u1", True, 10)
    store.record([ConsentChange("u1", False, 11), ConsentChange("anon:a", True, 1)])
    assert store.get_many(["u1", "anon:a", "nobody"]) == {
        "u1": ConsentChange("u1", False, 11),
        "anon:a": ConsentChange("anon:a", True, 1),
    }


def test_consent_table_keeps_the_newest_on_sqlite(settings: Settings) -> None:
    online = OnlineStore.from_settings(settings)
    try:
        _newest_wins(ConsentStore(online.engine))
    finally:
        online.dispose()


def test_consent_table_keeps_the_newest_on_postgres(pg_url: str) -> None:
    online = OnlineStore.from_settings(Settings(online_url=pg_url, _env_file=None))  # type: ignore[call-arg]
    try:
        _newest_wins(ConsentStore(online.engine))
        assert online.delete_user("u1")["nb_consent"] == 1
    finally:
        online.dispose()


def test_cache_expires_and_peeks_without_io(settings: Settings) -> None:
    online = OnlineStore.from_settings(settings)
    store = ConsentStore(online.engine)
    now = [0.0]
    cache = ConsentCache(store, ttl_s=1.0, clock=lambda: now[0])
    consent = consent_spec(default="granted").privacy.consent
    assert consent is not None
    try:
        assert cache.peek("u1", consent) is None  # nothing cached: would need a read
        assert cache.allowed("u1", consent) is True  # default
        store.record([ConsentChange("u1", False, 1)])  # another process writes
        assert cache.peek("u1", consent) is True  # still the cached answer
        now[0] = 1.5
        assert cache.peek("u1", consent) is None and cache.allowed("u1", consent) is False
        online.link_alias("a1", "u1")
        cache.prefetch(["anon:a1"], ["a1"])
        assert cache.peek("anon:a1", consent) is False  # follows the linked user
        cache.forget(["u1"])
        assert cache.peek("anon:a1", consent) is None
    finally:
        online.dispose()


class _SlowStore(ConsentStore):
    """A store whose reads return what they found before `during` ran: a concurrent
    writer recording (and caching) a newer decision while the read is in flight."""

    during: Any = None

    def get_many(self, subjects: Any) -> dict[str, ConsentChange]:
        found = super().get_many(subjects)
        if self.during is not None:
            during, self.during = self.during, None
            during()
        return found


def test_a_read_in_flight_never_replaces_a_newer_cached_decision(settings: Settings) -> None:
    online = OnlineStore.from_settings(settings)
    store = _SlowStore(online.engine)
    now = [0.0]
    cache = ConsentCache(store, ttl_s=1.0, clock=lambda: now[0])
    consent = consent_spec(default="denied").privacy.consent
    assert consent is not None
    revoke = ConsentChange("u1", False, 20)
    try:
        store.record([ConsentChange("u1", True, 10)])

        def record_revoke() -> None:
            store.record([revoke])
            cache.apply(revoke)

        for read in (lambda: cache.prefetch(["u1"], fresh=True), lambda: cache.stored("u1")):
            now[0] += 2  # the cached entry expired: the next read goes to the store
            store.record([ConsentChange("u1", True, 10)])  # no effect: older
            store.during = record_revoke
            read()
            assert cache.peek("u1", consent) is False  # not the grant the read found
        # An expired entry yields to the store (e.g. erased by another process).
        online.delete_user("u1")
        now[0] += 2
        cache.prefetch(["u1"], fresh=True)
        assert cache.stored("u1") is None
    finally:
        online.dispose()


def test_a_cached_link_stays_until_the_store_has_one(settings: Settings) -> None:
    online = OnlineStore.from_settings(settings)
    now = [0.0]
    cache = ConsentCache(ConsentStore(online.engine), ttl_s=1.0, clock=lambda: now[0])
    try:
        cache.link("a1", "u1")  # an identify the stream has not stored yet
        cache.link("a1", "u2")  # a later link is not followed (the stream keeps the first)
        now[0] = 5.0
        cache.prefetch([], ["a1"], fresh=True)
        assert cache.linked_user("a1") == "u1"
        online.link_alias("a1", "u3")  # what the store holds wins
        now[0] = 10.0
        assert cache.linked_user("a1") == "u3"
    finally:
        online.dispose()
