"""Events are checked against the spec one by one; a bad event never sinks the batch."""

from typing import Any

import pytest

from nextbest.ingest.validation import (
    EventRejected,
    accept_event,
    keyed_hash,
    pseudonymize,
    validate_batch,
    validate_event,
)

KEY = b"test-key"


def good(**kw: Any) -> dict[str, Any]:
    return {"type": "view", "user_id": "u1", "item_id": "i1", "ts": 1_700_000_000, **kw}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not an object", "JSON object"),
        (good(type="click"), "unknown event type 'click'"),
        (good(item_id=None), "'view' events need item_id"),
        ({"type": "view", "item_id": "i1", "ts": 1}, "needs user_id or anonymous_id"),
        (good(ts="yesterday"), "ts"),
        (good(type="rate"), "'rate' events need a numeric value"),
        (good(value=3.0), "'view' events take no value"),
        (
            good(type="purchase", properties={"quantity": "two"}),
            "'quantity' of 'purchase' must be int",
        ),
        (good(type="purchase", properties={"quantity": True}), "must be int"),
        (good(properties={"colour": "red"}), "undeclared properties ['colour']"),
        ({"type": "identify", "user_id": "u1", "ts": 1}, "needs anonymous_id and user_id"),
        (good(extra_field=1), "extra_field"),
        (good(value=float("nan"), type="rate"), "finite"),
    ],
)
def test_rejections_say_why(spec, raw: Any, reason: str) -> None:
    with pytest.raises(EventRejected, match=None) as caught:
        validate_event(raw, spec)
    assert reason in str(caught.value)


def test_iso_and_epoch_timestamps_agree(spec) -> None:
    a = validate_event(good(ts=1_700_000_000), spec)
    b = validate_event(good(ts="2023-11-14T22:13:20Z"), spec)
    c = validate_event(good(ts="2023-11-14T23:13:20+01:00"), spec)
    assert a.ts == b.ts == c.ts


def test_batch_keeps_valid_events_and_indexes_rejections(spec) -> None:
    raws = [good(event_id="a"), good(type="nope"), good(event_id="b"), good(event_id="a")]
    accepted, rejected = validate_batch(raws, spec)
    assert [e.event_id for e in accepted] == ["a", "b"]
    assert [(r.index, r.event_id) for r in rejected] == [(1, None), (3, "a")]
    assert "repeated" in rejected[1].reason


def test_missing_event_ids_are_assigned_and_unique(spec) -> None:
    accepted, _ = validate_batch([good(), good()], spec)
    assert len({e.event_id for e in accepted}) == 2


def identify(email: str) -> dict[str, Any]:
    return {
        "type": "identify",
        "anonymous_id": "a1",
        "user_id": "u1",
        "ts": 1,
        "properties": {"email": email},
    }


def test_pii_is_pseudonymized_with_a_keyed_hash(spec) -> None:
    raw = identify("jane@example.com")
    (event,), _ = validate_batch([raw], spec, key=KEY)
    assert event.properties["email"] == keyed_hash(KEY, "jane@example.com")
    assert "jane" not in event.to_json().decode()
    (other,), _ = validate_batch([raw], spec, key=b"another-key")
    assert other.properties["email"] != event.properties["email"]


def test_pseudonymizing_twice_equals_once(spec) -> None:
    """The API hashes, the stream reads the result back and hashes again: no change."""
    raw = identify("jane@example.com")
    once = accept_event(raw, spec, key=KEY)
    assert once.properties["email"] == keyed_hash(KEY, "jane@example.com")
    assert pseudonymize(once, spec, KEY) is once  # nothing to hash: the same object
    assert accept_event(once.model_dump(mode="json"), spec, key=KEY) == once
    assert accept_event(once, spec, key=KEY) == once


@pytest.mark.parametrize(
    "clear",
    [
        "h:jane.doe.198402@mail.example.org",  # the hash's length, not its digits
        "h:" + "a" * 31 + "g",
        "h:" + "a" * 30 + " a",
        "h:" + "a" * 33,
    ],
)
def test_clear_text_shaped_like_a_hash_is_still_hashed(spec, clear: str) -> None:
    """Idempotence must not let a client keep PII in clear by prefixing it with 'h:'
    (the first three have a hash's length: only its digits tell them apart)."""
    event = accept_event(identify(clear), spec, key=KEY)
    assert event.properties["email"] == keyed_hash(KEY, clear)
