"""Which records an erasure takes (`storage.erasure_scan.Person`): a person is named by
the identity fields of a record only, never by a value that happens to spell their id;
and which path ids the erasure routes refuse (system keys, control characters)."""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.app import create_app
from storage.erasure_scan import Person, provable, vocabulary
from tests.support.stream_helpers import write_catalog


def _j(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_record_names_a_person_only_through_its_identity_fields() -> None:
    view = Person("view", ["a1"])
    others = [
        _j(type="view", user_id="u2", item_id="i1", event_id="e1"),
        _j(type="click", user_id="u2", item_id="view", properties={"page": "view"}),
        _j(record="decision", decision_id="d1", user_id="u2", actions=[{"item_id": "view"}]),
        _j(type="view", anonymous_id="view2", event_id="viewer-1"),
        b'{"type": "view", "user_id": "u2", "item_id": "i1"',  # truncated: a dead letter
        b'\xff{"type":"view","user_id":"u2"}',  # not UTF-8
    ]
    assert [p for p in others if view.in_payload(p)] == []
    theirs = [
        _j(type="click", user_id="view", item_id="i1"),
        _j(type="click", anonymous_id="a1", item_id="i1"),
        _j(type="identify", user_id="u9", anonymous_id="a1"),
        _j(type="click", user_id="u2", event_id="web-view-3"),  # a client id embedding it
        _j(record="decision", decision_id="d1", user_id="anon:a1"),
        _j(
            record="decision",
            decision_id="d2",
            user_id="~nc:d2",
            features={"requested_user_id": "view"},
        ),
        b'{"type": "click", "user_id": "view", "item_id": "i1"',  # truncated
        b'\xff{"type":"click","anonymous_id":"a1"}',
    ]
    assert [p for p in theirs if not view.in_payload(p)] == []


def test_an_id_that_is_a_word_of_the_spec_is_not_byte_scanned(settings: Settings) -> None:
    words = vocabulary(settings.spec)
    assert provable(["view", "u1", "record"], words) == (["u1"], ["record", "view"])


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Any]]:
    spec = load_spec(settings.spec)
    write_catalog(settings, spec, DemoConfig(n_users=5, n_items=20, n_events=10), vectors=False)
    app = create_app(settings, require_keys=False, rate_limit_per_s=None, refresh_interval_s=0.2)
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("bad", ["item:i00001", "~nc:x", "anon:item:x", "anon:~nc:x", "u%00x"])
def test_a_system_key_as_path_id_is_a_422_naming_user_id(client: TestClient[Any], bad: str) -> None:
    for method, path in (
        ("DELETE", f"/v1/users/{bad}"),
        ("GET", f"/v1/users/{bad}/erasure"),
        ("GET", f"/v1/users/{bad}/features"),
    ):
        r = client.request(method, path)
        assert r.status_code == 422, (method, path, r.status_code, r.text)
        assert r.json()["extra"]["field"] == "user_id"
    assert client.get("/v1/users/anon:visitor1/erasure").status_code == 404
