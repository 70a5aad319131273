"""Erasure of visitors: `DELETE /v1/users/anon:<id>` for a visitor who never identified,
and a user whose decisions and feedback were logged under their anonymous id before
they identified. Real API (in process) and stream (`python -m pipelines`); after the
job says done, no file under the data home holds a byte of the ids, including the
client-chosen `event_id`s that embed them (Parquet, `_delta_log`, event log)."""

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.delta.store import DeltaStore
from tests.support.erasure_stack import Stack, api_and_stream, scan_apart
from tests.support.stream_helpers import write_catalog
from tests.support.waiting import wait_until

TAG = uuid.uuid4().hex[:8]
VISITOR = f"vis1{TAG}"  # never identifies
STITCHED = f"vis2{TAG}"  # identifies as USER later
USER = f"user{TAG}"
OTHER = f"other{TAG}"


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    spec = load_spec(settings.spec)
    write_catalog(settings, spec, DemoConfig(n_users=5, n_items=20, n_events=10), vectors=True)
    with api_and_stream(settings) as live:
        yield live


def _scan(home: Path, needles: list[str]) -> list[str]:
    return scan_apart(home, needles)


def _rows(delta: DeltaStore, table: str, column: str, value: str) -> int:
    if not delta.exists(table):
        return 0
    return delta.read(table, filters=[(column, "=", value)]).num_rows


def _decide_and_feedback(client: TestClient[Any], actor: str) -> None:
    r = client.post("/v1/decide", json={"user_id": actor, "k": 2})
    assert r.status_code in (200, 201), r.text
    feedback = {"decision_id": r.json()["decision_id"], "user_id": actor, "outcome": "click"}
    assert client.post("/v1/feedback", json=feedback).status_code == 202


def _erase(client: TestClient[Any], who: str) -> dict[str, Any]:
    assert client.delete(f"/v1/users/{who}").status_code == 202
    last: list[Any] = []

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/users/{who}/erasure").json()
        last[:] = [job]
        return job if job["status"] in ("done", "failed", "pending") else None

    try:
        wait_until(finished, timeout=60, what=f"the erasure of {who}", every=0.1)
    except AssertionError:
        raise AssertionError(f"erasure of {who} did not finish: {last}") from None
    return last[0]


def _ingest(client: TestClient[Any], proc: subprocess.Popen[bytes], settings: Settings) -> None:
    """Both visitors' events, decisions and feedback (under `anon:<id>`), then one of
    them identifies; OTHER is the bystander who must lose nothing."""
    ts = int(time.time()) - 60
    events = [
        # A visitor who never identifies; the client chose event ids naming them.
        {"type": "view", "anonymous_id": VISITOR, "item_id": "i00001", "ts": ts,
         "event_id": f"e-{TAG}-1"},
        {"type": "rate", "anonymous_id": VISITOR, "item_id": "i00001", "ts": ts,
         "value": 4.0, "event_id": f"web-{VISITOR}-2"},
        # A visitor who decides and gives feedback, then identifies as USER.
        {"type": "view", "anonymous_id": STITCHED, "item_id": "i00002", "ts": ts,
         "event_id": f"e-{TAG}-3"},
        {"type": "view", "user_id": OTHER, "item_id": "i00003", "ts": ts,
         "event_id": f"web-{OTHER}-1"},
    ]  # fmt: skip
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 202 and r.json()["accepted"] == 4, r.text
    _decide_and_feedback(client, f"anon:{VISITOR}")
    _decide_and_feedback(client, f"anon:{STITCHED}")
    _decide_and_feedback(client, OTHER)
    identify = {"type": "identify", "anonymous_id": STITCHED, "user_id": USER, "ts": ts + 1,
                "event_id": f"id-{STITCHED}"}  # fmt: skip
    assert client.post("/v1/events", json={"events": [identify]}).status_code == 202
    delta = DeltaStore.from_settings(settings)

    def streamed() -> bool:
        assert proc.poll() is None, (settings.home_dir / "logs" / "stream.log").read_text()
        online = client.app.state.runtime.serving
        return (
            _rows(delta, "events", "anonymous_id", VISITOR) == 2
            and _rows(delta, "events", "anonymous_id", STITCHED) == 2
            and _rows(delta, "decisions", "user_id", f"anon:{STITCHED}") == 1
            and _rows(delta, "feedback", "user_id", f"anon:{VISITOR}") == 1
            and _rows(delta, "feedback", "user_id", OTHER) == 1
            and online.resolve(f"anon:{STITCHED}") == USER
        )

    wait_until(streamed, timeout=30, what="events, decisions, feedback and the alias")
    before = " ".join(_scan(settings.home_dir, [VISITOR, STITCHED, USER]))
    assert all(i in before for i in (VISITOR, STITCHED, USER)), before


def _bystander_intact(settings: Settings) -> None:
    delta = DeltaStore.from_settings(settings)
    assert _rows(delta, "events", "user_id", OTHER) == 1
    assert _rows(delta, "decisions", "user_id", OTHER) == 1
    assert _rows(delta, "feedback", "user_id", OTHER) == 1
    assert _scan(settings.home_dir, [OTHER])  # still there


def test_a_visitor_who_never_identified_is_erased_from_every_file(
    settings: Settings, stack: Stack
) -> None:
    """`DELETE /v1/users/anon:<id>`: bronze rows keyed by `anonymous_id`, an event id
    naming the visitor (Parquet and `_delta_log`), decisions and feedback logged under
    `anon:<id>`, the event log. The job's `scan` is the proof."""
    client, proc = stack
    _ingest(client, proc, settings)
    job = _erase(client, f"anon:{VISITOR}")
    assert job["status"] == "done", json.dumps(job, indent=1)
    assert job["stores"]["scan"].startswith("done"), job
    assert _scan(settings.home_dir, [VISITOR]) == []
    _bystander_intact(settings)


def test_decisions_and_feedback_under_the_anonymous_id_go_with_the_user(
    settings: Settings, stack: Stack
) -> None:
    """Decided and gave feedback as `anon:<id>`, then identified: erasing the user
    erases what was logged under the anonymous id too, and so does `DELETE
    /v1/users/anon:<id>` of the stitched visitor (it names the same person)."""
    client, proc = stack
    _ingest(client, proc, settings)
    job = _erase(client, f"anon:{STITCHED}")
    assert job["status"] == "done", json.dumps(job, indent=1)
    assert _scan(settings.home_dir, [STITCHED, USER]) == []
    _bystander_intact(settings)
