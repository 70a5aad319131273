"""Consent per user (spec privacy.consent): the spec section, the shared rules (a batch
judged in order, aggregate-only events without the person) and the consent table with
its cache, on SQLite and PostgreSQL. `test_consent_http.py` runs the API and stream."""

from pathlib import Path
from typing import Any

import pytest

from nextbest.consent import (
    MARK,
    NO_CONSENT_PREFIX,
    ConsentChange,
    is_anonymized,
    screen,
)
from nextbest.events import Event
from nextbest.settings import Settings
from nextbest.spec import Spec
from nextbest.spec_loader import load_spec, parse_spec
from nextbest.validation import EventRejected, validate_event
from storage.online import OnlineStore
from storage.online_consent import ConsentCache, ConsentStore

ROOT = Path(__file__).resolve().parents[1]
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
    assert out.changes == [ConsentChange("u1", True, grant.ts_ms)]
    kept = dict(out.kept)
    assert kept[1] == grant  # the record of the choice is stored as sent
    assert all((kept[i].context.model_extra or {}).get(MARK) == "granted" for i in (2, 4, 5))


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
    assert is_anonymized(stored) and stored == again  # deterministic: retries deduplicate
    assert stored.user_id is None and (stored.anonymous_id or "").startswith(NO_CONSENT_PREFIX)
    assert stored.item_id == "i7" and stored.type == "view" and stored.ts == view.ts
    assert "u9" not in stored.to_json().decode()
    assert stored.context.session_id is None and stored.context.device == "mobile"
    # Passing through again (the stream) changes nothing.
    assert screen([stored], spec, Memory(), KEY).kept == [(0, stored)]


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
