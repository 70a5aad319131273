"""Erasure jobs started by `DELETE /v1/users/{user_id}`.

What the API owns it erases itself: the online store (features, state, aliases,
cached decisions, cap counters), its in-memory queues and caches, and, with the
embedded log (whose only writer is this process), every log record keyed by the
user or one of their anonymous ids. Then it appends a `record: erase` request keyed by
the user id, so it reaches the stream worker that owns the user, which erases the
stores it is the single writer of (Bytewax state, LanceDB users, Delta tables) and
reports each in the job (`pipelines.erasure`). Once every stream store is done, the
API removes that erase record from the log too: it names the user. Kafka records
cannot be deleted by a producer: they age out with the topic's retention, which the
job says.

The job row stores a keyed hash of the user id, never the id itself, so the erasure
record is not itself a trace of the person.
"""

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

from nextbest.validation import keyed_hash
from serving.runtime import ServingRuntime
from serving.sinks import EventLogSink
from storage.online_models import now_ms
from storage.online_serving import ErasureJob

log = logging.getLogger(__name__)

STREAM_STORES = (
    "lance_users",
    "stream_state",
    "delta_events",
    "delta_decisions",
    "delta_feedback",
)
STORES = ("online", "cached_decisions", "eventlog", *STREAM_STORES)
STREAM_WAIT_S = 3600.0
"""How long the API waits for the stream before leaving `eventlog` pending."""


def subject_of(runtime: ServingRuntime, user_id: str) -> str:
    return keyed_hash(runtime.pseudonymization_key, f"erasure:{user_id}")


def erase_record(user_id: str, job_id: str, anonymous_ids: list[str]) -> bytes:
    body = {
        "record": "erase",
        "user_id": user_id,
        "job_id": job_id,
        "anonymous_ids": anonymous_ids,
    }
    return json.dumps(body).encode()


def _is_erase_record(payload: bytes, job_id: str) -> bool:
    try:
        raw = json.loads(payload)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("record") == "erase" and raw.get("job_id") == job_id


def start_erasure(
    runtime: ServingRuntime,
    user_id: str,
    *,
    spawn: Callable[[Callable[[], None]], None] | None = None,
    stream_wait_s: float = STREAM_WAIT_S,
) -> ErasureJob:
    """Erase the online store now; rewrite the log and hand over to the stream in the
    background."""
    now = now_ms()
    anonymous = runtime.online.aliases_of(user_id)
    actors = {user_id, *(f"anon:{a}" for a in anonymous)}
    counts = runtime.serving.erase_user(user_id)
    for actor in actors:
        runtime.decision_log.forget(actor)
        runtime.metrics.forget(actor)
    cached = counts.pop("nb_cached_decisions", 0)
    log_owned = isinstance(runtime.sink, EventLogSink)
    stores = {
        "online": f"done: {sum(counts.values())} rows",
        "cached_decisions": f"done: {cached} rows",
        "eventlog": "running" if log_owned else "pending: topic retention (Kafka)",
        **{name: "pending: stream" for name in STREAM_STORES},
    }
    job = ErasureJob(
        job_id=uuid.uuid4().hex,
        subject=subject_of(runtime, user_id),
        status="running",
        stores=stores,
        created_at_ms=now,
        updated_at_ms=now_ms(),
    )
    runtime.serving.put_erasure_job(job)
    run = spawn or _thread
    run(lambda: _hand_over(runtime, job, user_id, sorted(anonymous), actors, stream_wait_s))
    return job


def _thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="erasure", daemon=True).start()


def _hand_over(
    runtime: ServingRuntime,
    job: ErasureJob,
    user_id: str,
    anonymous: list[str],
    actors: set[str],
    stream_wait_s: float,
) -> None:
    """Rewrite the log without the user, append the erase request, and once the stream
    reports every store done, remove the request itself."""
    sink = runtime.sink
    runtime.decision_log.flush()
    owned = isinstance(sink, EventLogSink)
    try:
        if isinstance(sink, EventLogSink):
            # The erase request is appended after this rewrite, so it survives it.
            removed = sink.log.rewrite_without(lambda key, _payload: key in actors)
            runtime.serving.update_erasure_stores(
                job.job_id, {"eventlog": f"running: {removed} records removed"}
            )
        sink.append([(user_id, erase_record(user_id, job.job_id, anonymous))])
    except Exception as exc:
        log.exception("erasure hand-over failed")
        runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": f"failed: {type(exc).__name__}"}
        )
        return
    if not owned:
        return
    deadline = time.monotonic() + stream_wait_s
    while time.monotonic() < deadline:
        current = runtime.serving.erasure_job(job.job_id)
        if current is None:
            return
        if all(current.stores.get(s, "").startswith(("done", "failed")) for s in STREAM_STORES):
            break
        time.sleep(0.1)
    else:
        runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": "pending: erase request still in the log (stream not done)"}
        )
        return
    try:
        assert isinstance(sink, EventLogSink)
        sink.log.rewrite_without(
            lambda key, payload: key in actors or _is_erase_record(payload, job.job_id)
        )
        runtime.serving.update_erasure_stores(job.job_id, {"eventlog": "done"})
    except Exception as exc:
        log.exception("event log erasure failed")
        runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": f"failed: {type(exc).__name__}"}
        )
