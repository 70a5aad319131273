"""The hostile cases of issue 12 as data: requests the door must refuse with a 4xx
(`named_cases`), a batch mixing valid and invalid events (`mixed_batch`), and records
a producer writes straight to the log past the API (`raw_records`)."""

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any


def dumps(body: Any) -> bytes:
    """JSON as a hostile client writes it: NaN and Infinity as bare literals."""
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


@dataclass(frozen=True)
class Named:
    """One hostile request and the 4xx statuses the door may answer it with."""

    name: str
    method: str
    path: str
    body: Any = None
    raw: bytes | None = None
    key: str | None = None
    want: tuple[int, ...] = (400, 422)  # validation: the schema (400) or the door (422)


def _view(user: str, item: str, ts: Any, **over: Any) -> dict[str, Any]:
    return {"type": "view", "user_id": user, "item_id": item, "ts": ts, **over}


def _events(*events: dict[str, Any]) -> dict[str, Any]:
    return {"events": list(events)}


def named_cases(tag: str, item: str, key_id: str) -> list[Named]:
    now = time.time()
    u = f"hostile-{tag}"
    rate = {"type": "rate", "user_id": u, "item_id": item, "ts": now - 5}
    deep = b'{"events":[' + b"[" * 3000 + b"]" * 3000 + b"]}"
    million = b'{"events":[' + b",".join([b"0"] * 1_000_000) + b"]}"
    five_mb = dumps(_events(_view(u, item, now, properties={"referrer": "r" * (5 << 20)})))
    cases = [
        Named("rate 1.7e308 (1)", "POST", "/v1/events", _events({**rate, "value": 1.7e308})),
        Named("rate 1.7e308 (2)", "POST", "/v1/events", _events({**rate, "value": 1.7e308})),
        Named(
            "rate NaN",
            "POST",
            "/v1/events",
            raw=dumps(_events({**rate, "value": math.nan})),
            want=(400,),
        ),
        Named("rate -1e308", "POST", "/v1/events", _events({**rate, "value": -1e308})),
        Named(
            "view ts 9999", "POST", "/v1/events", _events(_view(u, item, "9999-01-01T00:00:00Z"))
        ),
        Named("view ts 1e20", "POST", "/v1/events", _events(_view(u, item, 1e20))),
        Named("view ts 1969", "POST", "/v1/events", _events(_view(u, item, -86400 * 365))),
        Named(
            "view ts 1969 iso",
            "POST",
            "/v1/events",
            _events(_view(u, item, "1969-12-31T23:59:59Z")),
        ),
    ]
    for path in ("/v1/events", "/v1/decide", "/v1/feedback"):
        cases += [
            Named(f"3000 deep {path}", "POST", path, raw=deep, want=(400,)),
            Named(f"1e6 items {path}", "POST", path, raw=million, want=(400,)),
            Named(f"5 MB {path}", "POST", path, raw=five_mb, want=(413,)),
        ]
    bad_ids = {
        "300 chars": "u" * 300,
        "NUL": f"u\x00{tag}",
        "control": f"u\x01\x1b[2J{tag}",
        "DEL": f"u\x7f{tag}",
        "anon: prefix": f"anon:{tag}",
        "item: prefix": f"item:{item}",
        "~nc: prefix": f"~nc:{tag}",
    }
    decision = {"decision_id": uuid.uuid4().hex, "outcome": "click"}
    for label, bad in bad_ids.items():
        reserved = label.endswith("prefix")
        # Where a user id is read (decide, feedback), `anon:<id>` names a visitor: the
        # reserved prefixes are refused behind it too.
        ref = f"anon:{bad}" if label in ("anon: prefix", "item: prefix", "~nc: prefix") else bad
        cases += [
            Named(f"user_id {label}", "POST", "/v1/events", _events(_view(bad, item, now))),
            Named(f"decide {label}", "POST", "/v1/decide", {"user_id": ref}),
            Named(f"feedback {label}", "POST", "/v1/feedback", {**decision, "user_id": ref}),
        ]
        if not reserved:  # `anon:x` is a visitor's valid id where a user id is read
            cases.append(
                Named(f"item_id {label}", "POST", "/v1/events", _events(_view(u, bad, now)))
            )
            cases.append(
                Named(
                    f"event_id {label}",
                    "POST",
                    "/v1/events",
                    _events(_view(u, item, now, event_id=bad)),
                )
            )
    cases.append(
        Named(
            "anonymous_id item:",
            "POST",
            "/v1/events",
            _events({"type": "view", "anonymous_id": f"item:{item}", "item_id": item, "ts": now}),
        )
    )
    cases.append(
        Named(
            "feedback ts 0001+14",
            "POST",
            "/v1/feedback",
            {**decision, "user_id": u, "ts": "0001-01-01T00:00:00+14:00"},
        )
    )
    cases.append(
        Named(
            "feedback value 1.7e308",
            "POST",
            "/v1/feedback",
            {**decision, "user_id": u, "value": 1.7e308},
        )
    )
    for n in range(60):  # many distinct unknown surfaces, both ways of naming one
        cases.append(
            Named(
                f"surface {n}",
                "POST",
                "/v1/decide",
                {"user_id": u, "context": {"surface": f"nowhere-{n}-{tag}"}},
            )
        )
        cases.append(
            Named(f"surface field {n}", "POST", "/v1/decide", {"user_id": u, "surface": f"s{n}"})
        )
    for n in range(20):  # a real key id with a forged secret, and invented keys
        cases.append(
            Named(
                f"forged key {n}",
                "POST",
                "/v1/decide",
                {"user_id": u},
                key=f"nb_{key_id}_x{n}",
                want=(401,),
            )
        )
        cases.append(
            Named(
                f"random key {n}",
                "POST",
                "/v1/decide",
                {"user_id": u},
                key=f"nb_{uuid.uuid4().hex[:16]}_{uuid.uuid4().hex}",
                want=(401,),
            )
        )
        cases.append(
            Named(
                f"garbage key {n}",
                "POST",
                "/v1/events",
                _events(_view(u, item, now)),
                key="\u00ff" * n or "x",
                want=(401,),
            )
        )
    return cases


def mixed_batch(tag: str, item: str) -> tuple[dict[str, Any], list[str]]:
    """Valid events interleaved with every kind of invalid one; returns the valid ids."""
    now = time.time()
    u = f"mixed-{tag}"
    good = [_view(u, item, now - 30 + n, event_id=f"mixed-{tag}-{n}") for n in range(4)]
    bad = [
        {"type": "rate", "user_id": u, "item_id": item, "ts": now, "value": 1.7e308},
        _view(u, item, "9999-01-01T00:00:00Z"),
        _view("u" * 300, item, now),
        _view(f"u\x00{tag}", item, now),
        _view(f"item:{item}", item, now),
        _view(u, item, now, context={"deep": [[[[[[[[[[[[1]]]]]]]]]]]]}),
        {"type": "no_such_type", "user_id": u, "ts": now},
        {"type": "view"},
        {"type": "rate", "user_id": u, "item_id": item, "ts": now},  # value required
    ]
    events: list[dict[str, Any]] = []
    for n, g in enumerate(good):
        events += [g, *bad[n * 3 : n * 3 + 3]]
    return {"events": events}, [g["event_id"] for g in good]


# --- Records a producer wrote straight to the log (the stream's own door) --------------


@dataclass(frozen=True)
class RawRecords:
    """`dead`: records the stream must turn into dead letters (kept, they would poison
    an aggregate, collide with a system key or cannot be read at all); `tolerated`:
    odd but harmless records it may keep (the door refuses them, the stream need not)."""

    dead: list[tuple[str, bytes]]
    tolerated: list[tuple[str, bytes]]


def raw_records(tag: str, item: str) -> RawRecords:
    """What the API would refuse, appended to the log as a buggy or hostile producer
    (or an older API version) would: the stream must dead-letter each and go on."""
    now = time.time()
    u = f"poison-{tag}"

    def rec(event: dict[str, Any], key: str = u) -> tuple[str, bytes]:
        return key, dumps({"event_id": f"raw-{tag}-{uuid.uuid4().hex[:8]}", **event})

    rate = {"type": "rate", "user_id": u, "item_id": item, "ts": now - 5}
    dead = [
        rec({**rate, "value": 1.7e308}),
        rec({**rate, "value": 1.7e308}),  # two for one user: the sum overflows
        rec({**rate, "value": math.nan}),
        rec({**rate, "value": -1e308}),
        rec({**rate, "value": math.inf}),
        rec(_view(u, item, "9999-01-01T00:00:00Z")),
        rec(_view(u, item, 1e20)),
        rec(_view(u, item, "0001-01-01T00:00:00+14:00")),
        rec(_view("u" * 300, item, now), "u" * 300),
        rec(_view(f"u\x00{tag}", item, now), f"u\x00{tag}"),
        rec(_view(u, "i" * 300, now)),
        rec({"type": "no_such_type", "user_id": u, "ts": now}),
        rec({"type": "view", "ts": now}),
        (u, b"not json at all"),
        (u, b"\xff\xfe\x00garbage"),
        (u, b""),
        (u, b"[1, 2, 3]"),
        (u, b'"a string"'),
        # Reserved prefixes: kept, `item:<id>` would write user features into the
        # item's own online row (the door refuses these for that reason).
        rec(_view(f"item:{item}", item, now), f"item:{item}"),
        rec(_view(f"~nc:{tag}", item, now), f"~nc:{tag}"),
        rec(_view(f"anon:{tag}", item, now), f"anon:{tag}"),
        rec({"type": "view", "anonymous_id": f"item:{item}", "item_id": item, "ts": now}),
    ]
    # Records nested 3,000 deep are `DEEP_RECORDS`, tried on a stream of their own
    # (tests/pipelines/test_hostile_stream.py): today they stop the stream, and a stopped stream
    # here would hide every other verdict of the run.
    tolerated = [
        rec(_view(u, item, -1e9)),  # 1938: old history, windows ignore it
        rec(_view(u, item, now, context={"surface": "x" * 10_000})),
    ]
    return RawRecords(dead, tolerated)


DEEP_RECORDS = [
    b"[" * 3000 + b"]" * 3000,
    b'{"type": "view", "user_id": ' + b"[" * 3000 + b"]" * 3000 + b"}",
]
