"""The client's pure logic: when it retries and how long it waits, event ids fixed once,
batch results folded with the right indices, bodies encoded. The live behaviour
(through a real API, stream and a fault-injecting proxy) is in tests/e2e/test_client.py."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from nextbest.client import RetryPolicy, SendResult
from nextbest.client.protocol import batches, encode, with_event_id
from nextbest.client.retry import retry_after
from nextbest.ingest.events import Event
from tests.support.common import ROOT


def _response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after(_response(429, **{"Retry-After": "3"})) == 3.0
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = retry_after(_response(503, **{"Retry-After": format_datetime(when, usegmt=True)}))
    assert seconds is not None and 25 <= seconds <= 30
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert retry_after(_response(503, **{"Retry-After": past})) == 0.0
    assert retry_after(_response(503, **{"Retry-After": "soon"})) is None
    assert retry_after(_response(503)) is None


def test_delay_honours_retry_after_up_to_a_cap_else_backs_off_with_jitter() -> None:
    policy = RetryPolicy(backoff=0.5, max_backoff=4.0, max_retry_after=10.0)
    assert policy.delay(0, _response(429, **{"Retry-After": "7"})) == 7.0
    assert policy.delay(0, _response(429, **{"Retry-After": "600"})) == 10.0
    for attempt, cap in ((0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (9, 4.0)):
        delays = [policy.delay(attempt, _response(503)) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays), (attempt, max(delays))
        assert len(set(delays)) > 1, "jittered, so clients do not retry in step"


@pytest.mark.parametrize(
    ("outcome", "idempotent", "expected"),
    [
        (_response(429), False, True),
        (_response(503), False, True),
        (_response(502), True, True),
        (_response(504), True, True),
        (_response(502), False, False),  # a gateway may have passed feedback on
        (_response(500), True, False),
        (_response(400), True, False),
        (_response(401), True, False),
        (httpx.ConnectError("refused"), False, True),  # never reached the server
        (httpx.ReadTimeout("slow"), True, True),
        (httpx.ReadTimeout("slow"), False, False),  # feedback may have been recorded
        (httpx.RemoteProtocolError("dropped"), True, True),
        (httpx.RemoteProtocolError("dropped"), False, False),
    ],
)
def test_what_is_retried(outcome: object, idempotent: bool, expected: bool) -> None:
    assert RetryPolicy().retryable(outcome, idempotent=idempotent) is expected  # type: ignore[arg-type]


def test_event_ids_are_fixed_once_and_kept_when_given() -> None:
    given = {"type": "view", "user_id": "u", "event_id": "mine"}
    assert with_event_id(given) is given
    bare = {"type": "view", "user_id": "u"}
    first = with_event_id(bare)
    assert "event_id" not in bare and len(first["event_id"]) == 32
    assert with_event_id(first) is first, "a resend keeps the id"
    assert with_event_id({**bare, "event_id": None})["event_id"]  # null counts as missing
    assert with_event_id("not an object") == "not an object"  # the API rejects it
    event = Event(type="view", user_id="u", item_id="i", ts=datetime.now(UTC))
    assert with_event_id(event)["event_id"] == event.event_id


def test_batches_and_indices_of_rejections() -> None:
    assert [len(b) for b in batches(range(7), 3)] == [3, 3, 1]
    with pytest.raises(ValueError):
        list(batches([1], 0))
    with pytest.raises(TypeError, match="not one event"):
        list(batches({"type": "view"}, 10))
    result = SendResult(sent=5)
    result.add_body({"accepted": 1, "rejected": [{"index": 1, "reason": "ts"}]}, start=3)
    assert result.accepted == 1 and result.rejected[0].index == 4 and not result.ok


def test_bodies_encode_datetimes_and_models() -> None:
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = Event(type="view", user_id="u", item_id="i", ts=ts, event_id="e1")
    text = encode({"ts": ts, "events": [event]}).decode()
    assert '"ts":"2026-01-02T03:04:05+00:00"' in text and '"event_id":"e1"' in text


def test_importing_the_core_does_not_import_the_client() -> None:
    code = (
        "import sys, nextbest, nextbest.settings, nextbest.spec.loader; "
        "assert 'httpx' not in sys.modules; from nextbest import Client, AsyncClient; "
        "assert Client.__module__ == 'nextbest.client.sync'; print(nextbest.__version__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
