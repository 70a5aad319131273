"""Hostile input at the door (issue 12), through the real Litestar app: every bad value
is a 4xx naming its field, the valid events of a batch are still accepted, bodies are
bounded before decoding, labels stay bounded, keys are rate limited once verified."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from nextbest.settings import DEVELOPMENT_PSEUDONYMIZATION_KEY, KEY_FILE, Settings
from serving import run as serving_run
from serving.app import create_app
from serving.keys import create_key
from serving.metrics import OTHER, Bounded
from storage.eventlog.log import EventLog

ROOT = Path(__file__).resolve().parents[2]


def _settings(home: Path, **kw: Any) -> Settings:
    return Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None, **kw)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Litestar, TestClient[Any]]]:
    settings = _settings(tmp_path_factory.mktemp("door") / "home")
    app = create_app(settings, require_keys=False, rate_limit_per_s=None)
    with TestClient(app=app) as client:
        yield app, client


def _view(i: int, **over: Any) -> dict[str, Any]:
    return {
        "event_id": f"ok-{i}",
        "type": "view",
        "user_id": f"u{i}",
        "item_id": "i1",
        "ts": time.time(),
        **over,
    }


def _logged_ids(app: Litestar) -> set[str]:
    s: Settings = app.state.runtime.settings
    with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
        return {
            json.loads(payload).get("event_id")
            for p in range(s.partitions)
            for _, _, payload in log.read(p, 0, max_records=100_000)
        }


HOSTILE: list[tuple[dict[str, Any], str]] = [
    (_view(0, ts=1e20), "ts"),
    (_view(0, ts="0001-01-01T00:00:00+14:00"), "ts"),
    (_view(0, ts="9999-01-01T00:00:00Z"), "ts: more than 300 s ahead"),
    (_view(0, ts=time.time() + 3600), "ts: more than 300 s ahead"),
    (_view(0, ts=-1), "ts: before 1970"),
    ({**_view(0), "type": "rate", "value": 1.7e308}, "value: must be finite"),
    ({**_view(0), "type": "rate", "value": -1e13}, "value: must be finite"),
    (_view(0, user_id="u" * 250), "user_id: longer than 200"),
    (_view(0, user_id="u\x00x"), "user_id: control characters"),
    (_view(0, item_id="i\x001"), "item_id: control characters"),
    (_view(0, event_id="e" * 201), "event_id:"),
    (_view(0, event_id="e\x00"), "event_id: control characters"),
    (_view(0, user_id="anon:x"), "user_id: ids starting with"),
    (_view(0, user_id="item:i1"), "user_id: ids starting with"),
    (_view(0, user_id="~nc:x"), "user_id: ids starting with"),
    ({**_view(0), "user_id": None, "anonymous_id": "item:i1"}, "anonymous_id: ids starting"),
    (_view(0, context={"session_id": "s" * 300}), "context.session_id: longer"),
    (_view(0, context={"deep": [[[[[[[[[[1]]]]]]]]]]}), "context.deep"),
    (_view(0, context={"tags": list(range(5000))}), "context.tags: more than 1000"),
    (_view(0, context={"n": 1e300}), "context.n: must be finite"),
]


def test_hostile_events_are_rejected_by_field_and_their_siblings_kept(door) -> None:
    app, client = door
    events = [_view(1)] + [e for e, _ in HOSTILE] + [_view(2, ts="2001-09-09T01:46:40Z")]
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["event_ids"] == ["ok-1", "ok-2"]  # old ts is fine
    reasons = {x["index"]: x["reason"] for x in body["rejected"]}
    assert sorted(reasons) == list(range(1, len(HOSTILE) + 1))
    for i, (_, expected) in enumerate(HOSTILE, start=1):
        assert reasons[i].startswith(expected), (i, reasons[i])
    assert {"ok-1", "ok-2"} <= _logged_ids(app)
    # Alone, each is a 422 with its reason: never a 5xx.
    for event, expected in HOSTILE[:3]:
        r = client.post("/v1/events", json={"events": [event]})
        assert r.status_code == 422 and expected in r.json()["rejected"][0]["reason"]


def test_bodies_nested_deep_or_with_huge_arrays_are_refused_before_decoding(door) -> None:
    _, client = door
    deep = b'{"events": [' + b"[" * 3000 + b"]" * 3000 + b"]}"
    huge = json.dumps({"events": [_view(3, context={"tags": [0] * 20_000})]}).encode()
    tricky = json.dumps({"events": [_view(4, context={"note": "[" * 3000})]}).encode()
    headers = {"content-type": "application/json"}
    for path in ("/v1/events", "/v1/decide", "/v1/feedback"):
        r = client.post(path, content=deep, headers=headers)
        assert r.status_code == 400 and "nested deeper than 32" in r.json()["detail"], r.text
        r = client.post(path, content=huge, headers=headers)
        assert r.status_code == 400 and "more than 10000 items" in r.json()["detail"], r.text
    r = client.post("/v1/events", content=tricky, headers=headers)  # brackets in a string
    assert r.status_code == 202, r.text
    for literal in (b"NaN", b"Infinity", b"1e999"):
        raw = json.dumps({"events": [{**_view(5), "type": "rate", "value": 0}]}).encode()
        r = client.post("/v1/events", content=raw.replace(b'"value": 0', b'"value": ' + literal))
        assert r.status_code == 400, (literal, r.text)


def test_feedback_bounds_name_the_field(door) -> None:
    _, client = door
    ok = {"decision_id": "0" * 32, "user_id": "anon:visitor-1", "outcome": "click"}
    assert client.post("/v1/feedback", json=ok).status_code == 202
    bad = [
        ({"ts": "0001-01-01T00:00:00+14:00"}, "ts"),
        ({"ts": "9999-01-01T00:00:00Z"}, "ts"),
        ({"user_id": "item:i1"}, "user_id"),
        ({"user_id": "anon:~nc:x"}, "user_id"),
        ({"user_id": "u\x00"}, "user_id"),
        ({"item_id": "i" * 201}, "item_id"),
        ({"value": 1.7e308}, "value"),
    ]
    for over, field in bad:
        r = client.post("/v1/feedback", json={**ok, **over})
        assert r.status_code == 422, (over, r.text)
        assert r.json()["detail"].startswith(f"{field}:") and r.json()["extra"]["field"] == field


def test_unknown_surface_is_422_listing_the_known_ones(door) -> None:
    _, client = door
    for body, field in (
        ({"surface": "hmoe"}, "surface"),
        ({"context": {"surface": "x" * 150}}, "context.surface"),
    ):
        r = client.post("/v1/decide", json={"user_id": "u1", **body})
        assert r.status_code == 422, r.text
        out = r.json()
        assert out["detail"].startswith(f"{field}: unknown surface")
        assert out["extra"]["known"] == ["checkout", "default", "home", "product"]
    for surface in ("checkout", "home"):
        r = client.post("/v1/decide", json={"user_id": "u1", "surface": surface})
        assert r.status_code == 200 and r.json()["surface"] in (surface, "default")
    for bad in ({"user_id": "item:i1"}, {"user_id": "u1", "exclude": ["\x00"]}):
        r = client.post("/v1/decide", json=bad)
        assert r.status_code == 422 and r.json()["extra"]["field"] in ("user_id", "exclude[0]")
    r = client.post("/v1/decide", json={"user_id": "u1", "context": {"price": 1e300}})
    assert r.status_code == 422 and r.json()["extra"]["field"] == "context.price"


def test_metric_labels_stay_bounded_after_100_distinct_surfaces(door) -> None:
    app, client = door
    for i in range(100):
        client.post("/v1/decide", json={"user_id": "u1", "context": {"surface": f"s{i:03d}"}})
        client.request(f"M{i:03d}", "/v1/decide")
    text = client.get("/metrics").text
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not any("s0" in line for line in series)  # no surface became a label value
    assert not any("M0" in line for line in series)  # nor a method
    assert len(series) < 400, len(series)
    counter = Bounded(app.state.runtime.metrics.degraded.metric)
    values = {counter._bound(0, f"reason-{i}") for i in range(100)}
    assert len(values) == 33 and OTHER in values


def _keyed_app(tmp_path: Path, **kw: Any) -> Litestar:
    return create_app(_settings(tmp_path / "home", **kw), rate_limit_per_s=0.01, rate_limit_burst=2)


def test_a_forged_key_id_does_not_drain_the_real_keys_bucket(tmp_path: Path) -> None:
    app = _keyed_app(tmp_path)
    with TestClient(app=app) as client:
        real = create_key(app.state.runtime.keys.store, ["decide"])
        key_id = real.split("_")[1]
        for _ in range(5):
            r = client.post(
                "/v1/decide", json={"user_id": "u1"}, headers={"X-API-Key": f"nb_{key_id}_forged"}
            )
            assert r.status_code == 401
        codes = [
            client.post("/v1/decide", json={"user_id": "u1"}, headers={"X-API-Key": real})
            for _ in range(3)
        ]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1


def test_invented_key_ids_hit_the_failed_authentication_limit(tmp_path: Path) -> None:
    app = _keyed_app(tmp_path, auth_failures_per_min=5)
    with TestClient(app=app) as client:
        codes = [
            client.post(
                "/v1/decide", json={"user_id": "u1"}, headers={"X-API-Key": f"nb_{i:016x}_x"}
            ).status_code
            for i in range(8)
        ]
        assert codes == [401] * 5 + [429] * 3
        r = client.post("/v1/decide", json={"user_id": "u1"}, headers={"X-API-Key": "nb_a_b"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200


def test_non_loopback_api_refused_with_the_default_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served: list[str] = []
    monkeypatch.setattr(serving_run.uvicorn, "run", lambda app, **kw: served.append(kw["host"]))
    home = tmp_path / "home"
    for host in ("0.0.0.0", "10.1.2.3", "api.example.com", "::"):
        with pytest.raises(SystemExit, match="NEXTBEST_PSEUDONYMIZATION_KEY"):
            serving_run.run_api(_settings(home, api_host=host))
    assert served == []
    serving_run.run_api(_settings(home, api_host="127.0.0.1"))
    assert "default development pseudonymization key" in caplog.text
    serving_run.run_api(_settings(home, api_host="0.0.0.0", pseudonymization_key="s3cret-k3y"))
    home.mkdir(parents=True, exist_ok=True)
    (home / KEY_FILE).write_text("from-the-home-file\n")
    from_file = _settings(home, api_host="0.0.0.0")
    assert not from_file.default_pseudonymization_key
    assert from_file.pseudonymization_key.get_secret_value() == "from-the-home-file"
    serving_run.run_api(from_file)
    assert served == ["127.0.0.1", "0.0.0.0", "0.0.0.0"]
    assert _settings(tmp_path / "elsewhere").pseudonymization_key.get_secret_value() == (
        DEVELOPMENT_PSEUDONYMIZATION_KEY
    )


def test_bounds_come_from_settings(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path / "home",
        max_future_s=3600,
        max_id_length=20,
        min_event_ts="2000-01-01T00:00:00Z",
        max_abs_number=10,
    )
    app = create_app(settings, require_keys=False, rate_limit_per_s=None)
    with TestClient(app=app) as client:
        events = [
            _view(1, ts=time.time() + 1800),  # inside the wider skew
            _view(2, user_id="u" * 21),
            _view(3, ts="1999-12-31T23:59:59Z"),
            {**_view(4), "type": "rate", "value": 11},
        ]
        body = client.post("/v1/events", json={"events": events}).json()
        assert body["event_ids"] == ["ok-1"]
        assert [r["reason"].split(":")[0] for r in body["rejected"]] == ["user_id", "ts", "value"]
