"""`nextbest import events` under `privacy.consent`: the API's rules on history.

A file is judged in order against `nb_consent` plus the answers met earlier in the file
(across chunks), its consent events are recorded, and bronze holds only what consent
allows: nothing of a user without consent with `drop`, the item events without the
person with `aggregate`.
"""

import json
from pathlib import Path
from typing import Any

import pytest

import definitions.batch.importer as importer
from definitions.batch.importer import import_events
from nextbest.ingest.consent import MARK, NO_CONSENT_PREFIX, ConsentChange
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore
from storage.online.consent import ConsentStore
from storage.online.store import OnlineStore
from tests.core.test_consent import consent_spec

T0 = 1_736_000_000


def _ev(event_id: str, kind: str, t: int, user: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": kind, "user_id": user, "ts": T0 + t, **kw}


def _view(event_id: str, t: int, user: str | None = None, **kw: Any) -> dict[str, Any]:
    return _ev(event_id, "view", t, user, item_id="i1", **kw)


def _consent(event_id: str, t: int, user: str | None, granted: bool, **kw: Any) -> dict[str, Any]:
    return _ev(event_id, "consent", t, user, properties={"granted": granted}, **kw)


HISTORY = [
    _consent("c-yes", 1, "u_yes", True),
    _view("v-yes-1", 2, "u_yes"),
    _view("v-pre", 3, "u_pre"),  # granted in the table before the import
    _view("v-no", 4, "u_no"),  # never answered: the default (denied)
    _consent("c-rev-1", 5, "u_rev", True),
    _view("v-rev-before", 6, "u_rev"),
    _consent("c-rev-2", 7, "u_rev", False),  # revokes midway
    _view("v-rev-after", 8, "u_rev"),
    _consent("c-anon", 9, None, True, anonymous_id="a1"),  # a visitor grants...
    _view("v-anon", 10, anonymous_id="a1"),
    _ev("idf", "identify", 11, "u_new", anonymous_id="a1"),  # ...then logs in
    _view("v-new", 12, "u_new"),  # the user inherited the visitor's grant
    _view("v-yes-2", 13, "u_yes"),
    _view("v-forged", 14, "~nc:abc"),  # the reserved prefix: rejected
    _ev("idf-no", "identify", 15, "u_no", anonymous_id="a2"),  # no item, no consent
]
CONSENTED = {"c-yes", "v-yes-1", "v-pre", "c-rev-1", "v-rev-before", "c-rev-2"}
CONSENTED |= {"c-anon", "v-anon", "idf", "v-new", "v-yes-2"}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 events, so answers must carry from one chunk to the next."""
    monkeypatch.setattr(importer, "CHUNK_ROWS", 4)


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in HISTORY))
    return path


def _import(settings: Settings, spec: Spec, path: Path) -> importer.ImportSummary:
    return import_events(settings, spec, path, progress=False)


def _bronze(settings: Settings) -> list[dict[str, Any]]:
    return DeltaStore.from_settings(settings).read("events").to_pylist()


def _consent_rows(settings: Settings, subjects: list[str]) -> dict[str, ConsentChange]:
    online = OnlineStore.from_settings(settings)
    try:
        return ConsentStore(online.engine).get_many(subjects)
    finally:
        online.dispose()


def _grant_before_import(settings: Settings, subject: str) -> None:
    online = OnlineStore.from_settings(settings)
    try:
        ConsentStore(online.engine).record([ConsentChange(subject, True, (T0 - 86_400) * 1000)])
    finally:
        online.dispose()


def test_drop_keeps_exactly_the_consented_events(settings: Settings, tmp_path: Path) -> None:
    spec = consent_spec(default="denied", mode="drop")
    _grant_before_import(settings, "u_pre")
    path = _file(tmp_path)

    summary = _import(settings, spec, path)
    rows = _bronze(settings)
    assert {r["event_id"] for r in rows} == CONSENTED
    assert len(rows) == len(CONSENTED)
    assert (summary.read, summary.accepted) == (len(HISTORY), len(HISTORY) - 1)
    assert (summary.written, summary.dropped, summary.aggregated) == (len(CONSENTED), 3, 0)
    assert [line for line, _ in summary.rejected] == [14]
    assert "dropped 3, aggregated 0" in summary.lines()[0]
    assert summary.consent_recorded == 5  # four consent events, one inherited answer

    answers = _consent_rows(settings, ["u_yes", "u_rev", "u_pre", "anon:a1", "u_new", "u_no"])
    assert answers == {
        "u_yes": ConsentChange("u_yes", True, (T0 + 1) * 1000),
        "u_rev": ConsentChange("u_rev", False, (T0 + 7) * 1000),
        "u_pre": ConsentChange("u_pre", True, (T0 - 86_400) * 1000),
        "anon:a1": ConsentChange("anon:a1", True, (T0 + 9) * 1000),
        "u_new": ConsentChange("u_new", True, (T0 + 9) * 1000),
    }

    again = _import(settings, spec, path)  # same file: nothing new, no answer restored
    assert again.written == 0
    assert len(_bronze(settings)) == len(CONSENTED)
    assert _consent_rows(settings, ["u_rev"])["u_rev"].granted is False


def test_aggregate_keeps_item_events_without_the_person(settings: Settings, tmp_path: Path) -> None:
    spec = consent_spec(default="denied", mode="aggregate")
    _grant_before_import(settings, "u_pre")
    summary = _import(settings, spec, _file(tmp_path))

    rows = _bronze(settings)
    assert {r["event_id"] for r in rows} >= CONSENTED
    anonymized = [r for r in rows if r["event_id"] not in CONSENTED]
    # v-no and v-rev-after stay as item events without the person; idf-no has no item.
    assert (summary.aggregated, summary.dropped) == (2, 1)
    assert len(anonymized) == 2
    for row in anonymized:
        assert row["user_id"] is None
        assert row["anonymous_id"].startswith(NO_CONSENT_PREFIX)
        assert row["item_id"] == "i1" and row["type"] == "view"
        assert row["event_id"] not in {"v-no", "v-rev-after"}  # a keyed hash instead
    people = {r["user_id"] for r in rows} | {r["anonymous_id"] for r in rows}
    assert not people & {"u_no", "a2"}
    kept = next(r for r in rows if r["event_id"] == "v-yes-1")
    assert json.loads(kept["context"])[MARK].startswith("granted:")  # marked as the API does
