"""The door's bounds as pure logic: the raw body scan against a decoding reference,
and the importer holding history to the API's per-event bounds."""

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from definitions.batch.importer import import_events
from nextbest.ingest.limits import Limits, scan_json
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec


def _shape(value: Any, depth: int = 1) -> tuple[int, int]:
    """(nesting depth, longest array) of a decoded value: what the scan must find."""
    if isinstance(value, list | dict):
        children = list(value.values() if isinstance(value, dict) else value)
        inner = [_shape(c, depth + 1) for c in children]
        longest = len(value) if isinstance(value, list) else 0
        return max([depth, *(d for d, _ in inner)]), max([longest, *(a for _, a in inner)])
    return depth - 1, 0


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 7 or r < 0.3:
        return rng.choice([1, 'a"[{,\\', "x]]", None, 2.5, "\\\\", "\\", "}"])
    if r < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {f"k{i}[,": _random_json(rng, depth + 1) for i in range(rng.randint(0, 5))}


@pytest.mark.parametrize("pad", [0, 2000])  # small bodies walk, large ones vectorize
def test_scan_matches_the_decoded_shape(pad: int) -> None:
    rng = random.Random(pad)
    for _ in range(400):
        value = [_random_json(rng), list(range(pad))]
        depth, longest = _shape(value)
        body = json.dumps(value).encode()
        assert scan_json(body, max_depth=depth, max_array=longest) is None
        assert "deeper" in (scan_json(body, max_depth=depth - 1, max_array=longest) or "")
        if longest > 1:
            found = scan_json(body, max_depth=depth, max_array=longest - 1) or ""
            assert "array holds more than" in found


def test_scan_of_a_hostile_four_megabytes_is_bounded() -> None:
    for body in (b"[" * 4_000_000, b"[" + b"0," * 2_000_000 + b"0]"):
        started = time.perf_counter()
        assert scan_json(body, max_depth=32, max_array=10_000) is not None
        assert time.perf_counter() - started < 5.0  # linear, not per level or per item


def test_limits_name_the_field() -> None:
    limits = Limits()
    with pytest.raises(ValueError, match=r"^properties\.a\.b: nested deeper than 2"):
        Limits(max_nesting=2).check_json("properties", {"a": {"b": {"c": 1}}})
    with pytest.raises(ValueError, match=r"^properties\.x\[1\]: must be finite"):
        limits.check_json("properties", {"x": [1, float("inf")]})
    with pytest.raises(ValueError, match=r"^properties\.big: number out of range"):
        limits.check_json("properties", {"big": 10**400})


def test_import_keeps_old_history_and_rejects_the_future_and_reserved_ids(
    settings: Settings, tmp_path: Path
) -> None:
    spec = load_spec(settings.spec)
    base = {"type": "view", "item_id": "i1", "context": {"session_id": "s1"}}
    rows = [
        {**base, "event_id": "old", "user_id": "u1", "ts": "1999-12-31T23:59:59Z"},
        {**base, "event_id": "future", "user_id": "u1", "ts": time.time() + 86_400},
        {**base, "event_id": "item", "user_id": "item:i1", "ts": 1_736_000_000},
        {**base, "event_id": "nul", "user_id": "u\u0000", "ts": 1_736_000_000},
        {**base, "event_id": "deep", "user_id": "u2", "ts": 1, "context": {"x": [[[[[[[[1]]]]]]]]}},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[" * 100_000 + "\n")
    summary = import_events(settings, spec, path, progress=False)
    assert summary.accepted == 1
    reasons = dict(summary.rejected)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert reasons[2].startswith("ts: more than 300 s ahead")
    assert reasons[3].startswith("user_id: ids starting with")
    assert reasons[4].startswith("user_id: control characters")
    assert reasons[5].startswith("context.x")
    assert "nested too deep" in reasons[6]
