"""An API killed in the middle of an erasure job: the next API process finishes it.

The API's part of a job runs in a background thread after the job is returned (log
rewrite, waiting for the stream, removing the erase request, which names the user). The
crash is simulated by never running that thread; the stream's reports are written as the
stream would write them. Real event log, real online store, real `ServingRuntime`.
"""

import json
from collections.abc import Callable

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.erasure import STREAM_STORES, resume_erasures, start_erasure
from serving.runtime import ServingRuntime
from serving.sinks import EventLogSink
from storage.eventlog.log import EventLog

USER = "resume-canary-user"
OTHER = "resume-other-user"


def _never(_fn: Callable[[], None]) -> None:
    """The process dies before the background part of the job runs."""


def _inline(fn: Callable[[], None]) -> None:
    fn()


def _log_records(settings: Settings) -> list[tuple[str, bytes]]:
    log = EventLog.from_settings(settings, mode="reader")
    try:
        out: list[tuple[str, bytes]] = []
        for partition in range(log.partitions):
            offset = log.start_offsets()[partition]
            while batch := log.read(partition, offset):
                out += [(key, payload) for _, key, payload in batch]
                offset = batch[-1][0] + 1
        return out
    finally:
        log.close()


def _event(user: str, n: int) -> tuple[str, bytes]:
    body = {"event_id": f"{user}-{n}", "type": "view", "user_id": user, "item_id": "i00001"}
    return user, json.dumps(body).encode()


def test_a_restarted_api_finishes_an_interrupted_erasure(settings: Settings) -> None:
    spec = load_spec(settings.spec)
    runtime = ServingRuntime.open(settings, spec, require_keys=False)
    try:
        runtime.sink.append([_event(u, n) for n in range(3) for u in (USER, OTHER)])
        job = start_erasure(runtime, USER, spawn=_never)
    finally:
        runtime.close()

    # Before the restart: the request is durable and names the user, the job is open.
    keys = [k for k, _ in _log_records(settings)]
    assert keys.count(USER) == 4  # 3 events + the erase request
    assert any(b'"erase"' in p for _, p in _log_records(settings))

    runtime = ServingRuntime.open(settings, spec, require_keys=False)
    try:
        assert runtime.serving.erasure_job(job.job_id).status == "running"  # type: ignore[union-attr]
        # The stream (not running here) reports its stores as it would after the request.
        runtime.serving.update_erasure_stores(job.job_id, dict.fromkeys(STREAM_STORES, "done"))
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=5.0) == 1
        finished = runtime.serving.erasure_job(job.job_id)
        assert finished is not None
        assert finished.stores["eventlog"] == "done"
        assert finished.status == "done"
        assert runtime.serving.unfinished_erasure_jobs() == []
        # Nothing left to resume the next time.
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=5.0) == 0
    finally:
        runtime.close()

    records = _log_records(settings)
    assert [k for k, _ in records] == [OTHER] * 3
    assert not any(USER.encode() in p for _, p in records)


def test_a_job_whose_request_never_reached_the_log_says_delete_again(
    settings: Settings,
) -> None:
    spec = load_spec(settings.spec)
    runtime = ServingRuntime.open(settings, spec, require_keys=False)
    try:
        job = start_erasure(runtime, USER, spawn=_never)
        # As if the request had not been appended: remove it behind the API's back.
        assert isinstance(runtime.sink, EventLogSink)
        runtime.sink.log.rewrite_without(lambda _k, p: b'"erase"' in p)
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=1.0) == 0
        failed = runtime.serving.erasure_job(job.job_id)
        assert failed is not None
        assert failed.status == "failed"
        assert "DELETE the user again" in failed.stores["eventlog"]
        # DELETE again: a new job that completes once the stream reports.
        again = start_erasure(runtime, USER, spawn=_never)
        runtime.serving.update_erasure_stores(again.job_id, dict.fromkeys(STREAM_STORES, "done"))
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=5.0) == 1
        assert runtime.serving.erasure_job(again.job_id).status == "done"  # type: ignore[union-attr]
    finally:
        runtime.close()
