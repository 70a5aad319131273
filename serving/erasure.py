"""Erasure jobs started by `DELETE /v1/users/{user_id}`.

What the API owns it erases itself: the online store (features, state, aliases,
cached decisions, cap counters), its in-memory queues and caches, and, with the
embedded log (whose only writer is this process), every log record keyed by the
user or one of their anonymous ids. Then it appends a `record: erase` request keyed by
the user id, so it reaches the stream worker that owns the user, which erases the
stores it is the single writer of (Bytewax state, LanceDB users, Delta tables) and
reports each in the job (`pipelines.erasure`), including the Delta tables Dagster
derives from bronze. Once every stream store is done, the API removes that erase record
from the log too: it names the user.

Kafka records cannot be deleted by a producer. Once the stream is done, the job's
`eventlog` says what the topic's configuration does with them: `retention: ...` with
the date they age out (cleanup.policy=delete), or, on a compacted topic, tombstones
for every key the API produces the user's records with (the user id and `anon:<id>`)
so compaction drops them; `failed: ...` when the topic keeps records forever. A job
whose other stores are done is then `pending`, not `done`.

The job row stores a keyed hash of the user id, never the id itself, so the erasure
record is not itself a trace of the person. The erase request is appended before the job
is returned, so an API killed mid-job loses nothing: on start, `resume_erasures` finds
each unfinished job's request in the embedded log (it names the user) and finishes it.
"""

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from nextbest.ingest.events import anon_actor, anonymous_of
from nextbest.ingest.validation import keyed_hash
from serving.erasure_feed import erasure_feed, wipe_when_read
from serving.joblock import JobClaim, claim, claimed, released
from serving.runtime import ServingRuntime
from serving.sinks import EventLogSink, KafkaSink
from storage.delta.erasure import DERIVED_STORES
from storage.erasure_scan import Needles, Person, provable, scan_tree_apart, vocabulary
from storage.online.models import now_ms
from storage.online.serving import ErasureJob

log = logging.getLogger(__name__)

STREAM_STORES = (
    "lance_users",
    "stream_state",
    "delta_events",
    "delta_decisions",
    "delta_feedback",
    "delta_dead_letters",
    *DERIVED_STORES,
)
STORES = ("online", "cached_decisions", "eventlog", *STREAM_STORES, "scan")
"""`scan`: the proof. Once every other store is done, every file under the data home is
scanned for the ids (`storage.erasure_scan`); `done` only when none holds one."""
_UNFINISHED = ("running", "pending")
STREAM_WAIT_S = 3600.0
"""How long the API waits for the stream before leaving `eventlog` pending."""


def subject_of(runtime: ServingRuntime, user_id: str) -> str:
    return keyed_hash(runtime.pseudonymization_key, f"erasure:{user_id}")


def person_of(runtime: ServingRuntime, user_id: str) -> tuple[str, list[str]]:
    """(user id, anonymous ids) of the person a DELETE names. `anon:<id>` is a visitor:
    the user an identify linked them to, if any (everything stitched goes together),
    else the visitor alone, whose `<id>` is then their one anonymous id."""
    person = user_id if anonymous_of(user_id) is None else runtime.serving.resolve(user_id)
    anonymous = set(runtime.online.aliases_of(person))
    visitor = anonymous_of(person)
    if visitor is not None:
        anonymous.add(visitor)
    return person, sorted(anonymous)


def traces(runtime: ServingRuntime, person: str, anonymous: Iterable[str]) -> Needles:
    """What no file may hold once the job is done: the ids as bytes, and the keyed hash
    the stream keys their state by (`pipelines.flow.state_key`)."""
    anonymous = list(anonymous)
    actors = {person, *(anon_actor(a) for a in anonymous)}
    hashed = [keyed_hash(runtime.pseudonymization_key, f"state:{a}") for a in actors]
    ids, _words = provable([person, *anonymous], vocabulary(runtime.settings.spec))
    return Needles([*ids, *hashed])


def erase_record(user_id: str, job_id: str, anonymous_ids: list[str]) -> bytes:
    body = {
        "record": "erase",
        "user_id": user_id,
        "job_id": job_id,
        "anonymous_ids": anonymous_ids,
    }
    return json.dumps(body).encode()


def _is_any_erase_record(payload: bytes) -> bool:
    if b'"erase"' not in payload:
        return False
    try:
        raw = json.loads(payload)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("record") == "erase"


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
    subject = subject_of(runtime, user_id)
    running = runtime.serving.latest_erasure_job(subject)
    if running is not None and running.status == "running":
        # A repeated DELETE while a job runs joins it: a loop of requests for one person
        # costs one job (its final log pass and scan come after every request so far).
        return running
    user_id, anonymous = person_of(runtime, user_id)
    actors = {user_id, *(anon_actor(a) for a in anonymous)}
    counts = runtime.serving.erase_user(user_id)
    for actor in actors:
        runtime.decision_log.forget(actor)
        runtime.metrics.forget(actor)
        runtime.answers.forget(actor)
    announced = erasure_feed(runtime.settings).announce(sorted(actors)), time.monotonic()
    cached = counts.pop("nb_cached_decisions", 0)
    log_owned = isinstance(runtime.sink, EventLogSink)
    stores = {
        "online": f"done: {sum(counts.values())} rows",
        "cached_decisions": f"done: {cached} rows",
        "eventlog": "running" if log_owned else "running: erase request to the topic",
        **{name: "pending: stream" for name in STREAM_STORES},
        "scan": "pending: every store done",
    }
    job = ErasureJob(
        job_id=uuid.uuid4().hex,
        subject=subject,
        status="running",
        stores=stores,
        created_at_ms=now,
        updated_at_ms=now_ms(),
    )
    runtime.serving.put_erasure_job(job)
    runtime.decision_log.flush()
    try:
        # Durable before the job is returned: the request is what a restarted API resumes.
        runtime.sink.append([(user_id, erase_record(user_id, job.job_id, sorted(anonymous)))])
    except Exception as exc:
        log.exception("erasure request could not be appended")
        updated = runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": f"failed: {type(exc).__name__}; DELETE the user again"}
        )
        return updated or job
    run = spawn or _thread
    hand_over = lambda: _hand_over(  # noqa: E731
        runtime, job, user_id, anonymous, stream_wait_s, announced=announced
    )
    run(claimed(runtime.settings.run_dir, job.job_id, hand_over))
    return job


def resume_erasures(
    runtime: ServingRuntime,
    *,
    spawn: Callable[[Callable[[], None]], None] | None = None,
    stream_wait_s: float = STREAM_WAIT_S,
) -> int:
    """Finish the API's part of jobs a previous API process left unfinished (it was
    killed or restarted mid-job); returns how many were resumed. The user's id is only in
    the job's erase request, so with the embedded log it is read back from there; a Kafka
    topic is not scanned, so those jobs say to DELETE again (which is idempotent)."""
    claims: dict[str, JobClaim] = {}
    unfinished = []
    for listed in runtime.serving.unfinished_erasure_jobs():
        # Only jobs no live API process runs (several workers), read again once claimed.
        owner = claim(runtime.settings.run_dir, listed.job_id)
        current = runtime.serving.erasure_job(listed.job_id) if owner is not None else None
        if owner is not None and current is not None and current.status in _UNFINISHED:
            claims[current.job_id] = owner
            unfinished.append(current)
        elif owner is not None:
            owner.release()
    try:
        return _resume(runtime, unfinished, claims, spawn, stream_wait_s)
    finally:
        for owner in claims.values():
            owner.release()  # no-op for the claims handed over to a thread


def _resume(
    runtime: ServingRuntime,
    unfinished: list[ErasureJob],
    claims: dict[str, JobClaim],
    spawn: Callable[[Callable[[], None]], None] | None,
    stream_wait_s: float,
) -> int:
    for j in unfinished:
        log_done = j.stores.get("eventlog", "").startswith(("done", "retention"))
        if log_done and not j.stores.get("scan", "").startswith(("done", "failed")):
            # The request that names the user is gone from the log: nothing to scan for.
            runtime.serving.update_erasure_stores(
                j.job_id, {"scan": "failed: the API restarted before the scan; DELETE again"}
            )
    open_jobs = {
        j.job_id: j
        for j in unfinished
        if not j.stores.get("eventlog", "").startswith(("done", "failed", "retention"))
    }
    if not open_jobs:
        return 0
    sink = runtime.sink
    if not isinstance(sink, EventLogSink):
        for job_id in open_jobs:
            runtime.serving.update_erasure_stores(
                job_id, {"eventlog": "failed: the API restarted mid-job; DELETE the user again"}
            )
        return 0
    found = _erase_requests(sink, set(open_jobs))
    run = spawn or _thread
    for job_id, job in open_jobs.items():
        request = found.get(job_id)
        if request is None:
            runtime.serving.update_erasure_stores(
                job_id, {"eventlog": "failed: no erase request in the log; DELETE the user again"}
            )
            continue
        user_id, anonymous = request
        owner = claims.pop(job_id, None)
        run(
            released(
                owner,
                lambda job=job, user_id=user_id, anonymous=anonymous: _hand_over(
                    runtime, job, user_id, anonymous, stream_wait_s
                ),
            )
        )
    return len(found)


def _erase_requests(sink: EventLogSink, job_ids: set[str]) -> dict[str, tuple[str, list[str]]]:
    """job_id -> (user_id, anonymous_ids) of the erase requests in the log."""
    out: dict[str, tuple[str, list[str]]] = {}
    starts = sink.log.start_offsets()
    for partition in range(sink.log.partitions):
        offset = starts.get(partition, 0)
        while batch := sink.log.read(partition, offset, max_records=5000):
            for off, _key, payload in batch:
                if b'"erase"' in payload:
                    raw = json.loads(payload)
                    if raw.get("record") == "erase" and raw.get("job_id") in job_ids:
                        out[raw["job_id"]] = (raw["user_id"], list(raw.get("anonymous_ids") or []))
                offset = off + 1
    return out


def _thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="erasure", daemon=True).start()


def _hand_over(
    runtime: ServingRuntime,
    job: ErasureJob,
    person: str,
    anonymous: list[str],
    stream_wait_s: float,
    *,
    announced: tuple[list[int], float] = ([], 0.0),
) -> None:
    """Rewrite the log without the person (keeping erase requests, which the stream
    still needs), and once the stream reports every store done, remove the requests
    too (embedded log) or report what the topic's configuration does with the records
    (Kafka); then prove it with a scan of the data home. Safe to run again after a
    restart: every step is idempotent."""
    sink = runtime.sink
    owned = isinstance(sink, EventLogSink)
    actors = {person, *(anon_actor(a) for a in anonymous)}
    named = Person(person, anonymous)

    def theirs(key: str, payload: bytes) -> bool:
        # Their key, or a record naming them in an identity field (an event of theirs
        # keyed by someone else, an event id embedding their id): never a record that
        # merely spells the id (`"type": "view"` is not user `view`).
        return key in actors or named.in_payload(payload)

    try:
        if isinstance(sink, EventLogSink):
            removed = sink.log.rewrite_without(
                lambda key, payload: theirs(key, payload) and not _is_any_erase_record(payload)
            )
            runtime.serving.update_erasure_stores(
                job.job_id, {"eventlog": f"running: {removed} records removed"}
            )
    except Exception as exc:
        log.exception("erasure hand-over failed")
        runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": f"failed: {type(exc).__name__}"}
        )
        return
    if not _stream_done(runtime, job.job_id, stream_wait_s):
        where = "log" if owned else "topic"
        runtime.serving.update_erasure_stores(
            job.job_id,
            {"eventlog": f"pending: erase request still in the {where} (stream not done)"},
        )
        return
    try:
        if isinstance(sink, EventLogSink):
            sink.log.rewrite_without(theirs)
            status = "done"
        elif isinstance(sink, KafkaSink):
            status = kafka_erasure(sink, runtime.settings.kafka_bootstrap or "", sorted(actors))
        else:
            status = f"retention: {type(sink).__name__} cannot delete records"
        runtime.serving.update_erasure_stores(job.job_id, {"eventlog": status})
    except Exception as exc:
        log.exception("event log erasure failed")
        runtime.serving.update_erasure_stores(
            job.job_id, {"eventlog": f"failed: {type(exc).__name__}"}
        )
        return
    wipe_when_read(runtime.settings, *announced)  # the other workers' news, before the scan
    runtime.serving.update_erasure_stores(
        job.job_id, {"scan": prove(runtime, traces(runtime, person, anonymous))}
    )


def prove(runtime: ServingRuntime, needles: Needles, *, timeout_s: float = 10.0) -> str:
    """The `scan` status: every file under the data home, searched for the ids. Files
    in flux (a WAL being checkpointed, a table being compacted) get a few retries."""
    home = runtime.settings.home_dir
    deadline = time.monotonic() + timeout_s
    while True:
        runtime.serving.scrub()
        found = scan_tree_apart(home, needles)  # never open our own SQLite files here
        if not found:
            files = sum(len(f) for _, _, f in os.walk(home))
            return f"done: none of {files} files under the data home holds an id"
        if time.monotonic() > deadline:
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            shown = ", ".join(found[:10]) + more
            return f"failed: still found in {shown}"
        time.sleep(0.2)


def _stream_done(runtime: ServingRuntime, job_id: str, wait_s: float) -> bool:
    """Wait until the stream reported every store it owns (done or failed)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        current = runtime.serving.erasure_job(job_id)
        if current is None:
            return False
        if all(current.stores.get(s, "").startswith(("done", "failed")) for s in STREAM_STORES):
            return True
        time.sleep(0.1)
    return False


def kafka_erasure(
    sink: KafkaSink, bootstrap: str, keys: Iterable[str], *, timeout_s: float = 10.0
) -> str:
    """Read the topic's cleanup configuration; on a compacted topic produce a tombstone
    for every key; return the `eventlog` status that says what happens to the records."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, sink.topic)
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        entries = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
        configs = {k: v.value for k, v in entries.result(timeout=timeout_s).items()}
    except Exception as exc:
        return (
            f"retention: Kafka cannot delete single records, and the configuration of topic "
            f"{sink.topic!r} could not be read ({type(exc).__name__}): they age out with "
            "its retention"
        )
    tombstones = 0
    if "compact" in (configs.get("cleanup.policy") or ""):
        tombstones = produce_tombstones(sink, keys, timeout_s=timeout_s)
    return kafka_log_status(sink.topic, configs, tombstones=tombstones, now_ms=now_ms())


def produce_tombstones(sink: KafkaSink, keys: Iterable[str], *, timeout_s: float) -> int:
    """A null-value record per key, acknowledged by every in-sync replica."""
    errors: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    n = 0
    for key in keys:
        sink.producer.produce(sink.topic, None, key.encode(), on_delivery=delivered)
        n += 1
    if sink.producer.flush(timeout_s) > 0:
        raise TimeoutError(f"Kafka did not acknowledge the tombstones within {timeout_s}s")
    if errors:
        raise RuntimeError(f"tombstone delivery failed: {errors[0]}")
    return n


def kafka_log_status(
    topic: str, configs: Mapping[str, str | None], *, tombstones: int, now_ms: int
) -> str:
    """What the topic's cleanup policy does with the user's records, as a job status.
    Unset settings are the broker's defaults (Kafka's: delete after 7 days)."""
    policy = configs.get("cleanup.policy") or "delete"
    retention = configs.get("retention.ms")
    notes: list[str] = []
    if "compact" in policy:
        segment = configs.get("segment.ms") or "the default"
        lag = configs.get("max.compaction.lag.ms") or "the default"
        notes.append(
            f"{tombstones} tombstones produced for the user's keys; compaction removes "
            f"their records once their segment closes (segment.ms={segment}, "
            f"max.compaction.lag.ms={lag})"
        )
    if "delete" in policy:
        if retention is None:
            notes.append("records age out with the broker's default retention")
        elif int(retention) >= 0:
            until = datetime.fromtimestamp((now_ms + int(retention)) / 1000, tz=UTC)
            notes.append(f"records age out by {until.isoformat()} (retention.ms={retention})")
        elif "compact" not in policy:
            return (
                f"failed: topic {topic!r} keeps records forever (retention.ms={retention}, "
                f"cleanup.policy={policy}) and Kafka cannot delete single records: lower its "
                "retention or make it compacted"
            )
    detail = "; ".join(notes) or f"cleanup.policy={policy}"
    return f"retention: Kafka cannot delete single records from {topic!r}; {detail}"
