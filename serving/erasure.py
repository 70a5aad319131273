"""Erasure jobs started by `DELETE /v1/users/{user_id}`.

What the API owns it erases itself: the online store (features, state, aliases,
cached decisions, cap counters), its in-memory queues and caches, and, with the
embedded log (whose only writer is this process), every log record keyed by the
user or one of their anonymous ids. The other stores have other single writers: the
LanceDB users table and Bytewax state (the stream), the Delta tables (the stream
and Dagster). Their entries say "pending: ..." until those owners act; this job does
not pretend otherwise. Kafka records cannot be deleted by a producer: they age out
with the topic's retention, which the job says too.

The job row stores a keyed hash of the user id, never the id itself, so the erasure
record is not itself a trace of the person.
"""

import logging
import threading
import uuid
from collections.abc import Callable

from nextbest.validation import keyed_hash
from serving.runtime import ServingRuntime
from serving.sinks import EventLogSink
from storage.online_models import now_ms
from storage.online_serving import ErasureJob

log = logging.getLogger(__name__)

OTHER_OWNERS = {
    "vector_users": "pending: stream",
    "stream_state": "pending: stream",
    "delta_events": "pending: stream",
    "delta_decisions": "pending: stream",
    "delta_derived": "pending: dagster",
}


def subject_of(runtime: ServingRuntime, user_id: str) -> str:
    return keyed_hash(runtime.pseudonymization_key, f"erasure:{user_id}")


def start_erasure(
    runtime: ServingRuntime,
    user_id: str,
    *,
    spawn: Callable[[Callable[[], None]], None] | None = None,
) -> ErasureJob:
    """Erase the online store now; rewrite the embedded log in the background."""
    now = now_ms()
    anonymous = [f"anon:{a}" for a in runtime.online.aliases_of(user_id)]
    actors = {user_id, *anonymous}
    counts = runtime.serving.erase_user(user_id)
    for actor in actors:
        runtime.decision_log.forget(actor)
        runtime.metrics.forget(actor)
    stores = {
        "online_store": f"done: {sum(counts.values())} rows",
        "api_memory": "done",
        **OTHER_OWNERS,
    }
    log_owned = isinstance(runtime.sink, EventLogSink)
    stores["event_log"] = "running" if log_owned else "pending: topic retention (Kafka)"
    job = ErasureJob(
        job_id=uuid.uuid4().hex,
        subject=subject_of(runtime, user_id),
        status="running" if log_owned else "pending",
        stores=stores,
        created_at_ms=now,
        updated_at_ms=now_ms(),
    )
    runtime.serving.put_erasure_job(job)
    if log_owned:
        run = spawn or _thread
        run(lambda: _erase_log(runtime, job, actors))
    return job


def _thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="erasure", daemon=True).start()


def _erase_log(runtime: ServingRuntime, job: ErasureJob, actors: set[str]) -> None:
    sink = runtime.sink
    assert isinstance(sink, EventLogSink)
    runtime.decision_log.flush()
    stores = dict(job.stores)
    try:
        removed = sink.log.rewrite_without(lambda key, _payload: key in actors)
        stores["event_log"] = f"done: {removed} records"
    except Exception as exc:
        log.exception("event log erasure failed")
        stores["event_log"] = f"failed: {type(exc).__name__}"
    failed = any(v.startswith("failed") for v in stores.values())
    status = "failed" if failed else "pending"
    runtime.serving.put_erasure_job(
        ErasureJob(job.job_id, job.subject, status, stores, job.created_at_ms, now_ms())
    )
