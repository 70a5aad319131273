"""Events are checked against the spec one by one; a bad event never sinks the batch."""

from typing import Any

import pytest

from nextbest.ingest.validation import EventRejected, keyed_hash, validate_batch, validate_event

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


def test_pii_is_pseudonymized_with_a_keyed_hash(spec) -> None:
    raw = {
        "type": "identify",
        "anonymous_id": "a1",
        "user_id": "u1",
        "ts": 1,
        "properties": {"email": "jane@example.com"},
    }
    (event,), _ = validate_batch([raw], spec, key=KEY)
    assert event.properties["email"] == keyed_hash(KEY, "jane@example.com")
    assert "jane" not in event.to_json().decode()
    (other,), _ = validate_batch([raw], spec, key=b"another-key")
    assert other.properties["email"] != event.properties["email"]
