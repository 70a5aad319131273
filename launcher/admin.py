"""`nextbest status`, `nextbest doctor` and `nextbest keys list/revoke`: read every store
directly (no running API needed) and say what a person needs to know; `status` adds the
live figures of the running stream and API from their metrics (`launcher.live`)."""

import contextlib
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from launcher import live
from nextbest.locks import running
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.models import ApiKeyTable, UserFeatureTable
from storage.online.store import OnlineStore
from storage.vectors import VectorStore

STREAM_TABLES = {
    "events": "bronze",
    "dead_letters": "dead_letters",
    "decisions": "decisions",
    "feedback": "feedback",
}
"""Delta tables the stream appends with `app_id=f"{prefix}-p{partition}"` and the
highest source offset as batch version: together they are its committed offsets."""


def _ms(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def list_keys(settings: Settings) -> list[dict[str, Any]]:
    store = OnlineStore.from_settings(settings)
    table = ApiKeyTable.__table__  # pyright: ignore[reportAttributeAccessIssue]
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(table).order_by(table.c.created_at_ms)).mappings()
            return [
                {
                    "key_id": r["key_id"],
                    "scopes": list(r["scopes"]),
                    "created": _ms(r["created_at_ms"]),
                    "revoked": bool(r["revoked"]),
                }
                for r in rows
            ]
    finally:
        store.dispose()


def revoke_key(settings: Settings, key_id: str) -> bool:
    from serving.keys import announce_revocation

    store = OnlineStore.from_settings(settings)
    try:
        revoked = store.revoke_api_key(key_id)
    finally:
        store.dispose()
    if revoked:  # every API process of this home drops its key cache now
        announce_revocation(settings.run_dir)
    return revoked


def _online(settings: Settings) -> dict[str, Any]:
    store = OnlineStore.from_settings(settings)
    features = UserFeatureTable.__table__  # pyright: ignore[reportAttributeAccessIssue]
    try:
        with store.engine.connect() as conn:
            users = conn.execute(sa.select(sa.func.count(sa.distinct(features.c.user_id))))
            n_users = int(users.scalar() or 0)
            n_rows = int(
                conn.execute(sa.select(sa.func.count()).select_from(features)).scalar() or 0
            )
        models = store.list_models()
        promoted = store.promoted_model()
    finally:
        store.dispose()
    return {
        "online_users": n_users,
        "online_features": n_rows,
        "models": len(models),
        "promoted_model": promoted.version if promoted else None,
    }


def _stream_offsets(settings: Settings, delta: DeltaStore) -> dict[str, Any]:
    """Event-log end offsets against what the stream committed to Delta, per partition."""
    if settings.kafka_bootstrap:
        return {"event_log": f"kafka {settings.kafka_bootstrap} (lag: see the consumer)"}
    log = EventLog.from_settings(settings, mode="reader")
    try:
        ends = log.end_offsets()
    finally:
        log.close()
    committed: dict[int, int] = {}
    for p in ends:
        versions = [
            delta.transaction_version(table, f"{prefix}-p{p}")
            for table, prefix in STREAM_TABLES.items()
            if delta.exists(table)
        ]
        done = [v for v in versions if v is not None]
        committed[p] = max(done) + 1 if done else 0
    lag = {p: max(0, ends[p] - committed[p]) for p in ends}
    return {
        "event_log_end": sum(ends.values()),
        "stream_committed": sum(committed.values()),
        "stream_lag": sum(lag.values()),
        "lag_by_partition": {str(p): n for p, n in lag.items()},
    }


def status_info(settings: Settings, spec: Spec) -> dict[str, Any]:
    """Counts from every store plus which components run (from the lock files)."""
    info: dict[str, Any] = {"home": str(settings.home_dir)}
    delta = DeltaStore.from_settings(settings)
    info["delta_events"] = delta.count("events") if delta.exists("events") else 0
    info.update(_online(settings))
    vectors = VectorStore.from_settings(settings, dim=spec.model.dim)
    for table in ("items", "users"):
        try:
            info[f"lance_{table}"] = vectors.count(table)
        except Exception:
            info[f"lance_{table}"] = 0
    info.update(_stream_offsets(settings, delta))
    keys = list_keys(settings)
    info["api_keys"] = sum(not k["revoked"] for k in keys)
    info["api_keys_revoked"] = sum(k["revoked"] for k in keys)
    held = running(settings.home_dir)
    info["running"] = {role: f"pid {h.pid}" for role, h in held.items()}
    info.update(live.stream_info(settings))  # the stream's own metrics (pipelines.metrics)
    if "api" in held or "up" in held:
        info.update(live.api_info(settings))
    return info


def format_status(info: dict[str, Any]) -> list[str]:
    lines = []
    width = max(18, *(len(name) for name in info))
    for name, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "nothing"  # type: ignore[union-attr]
        lines.append(f"{name:<{width}} {value}")
    return lines


def doctor(settings: Settings, *, reset_stream: bool) -> tuple[list[str], int]:
    """Check what keeps components from starting; with `reset_stream`, clear the
    stream's recovery state. Returns lines to print and an exit code (0: healthy)."""
    from pipelines.run import recovery_problems, reset_recovery

    lines: list[str] = [f"data home          {settings.home_dir}"]
    held = running(settings.home_dir)
    for role, h in held.items():
        lines.append(f"running            {role} ({h.describe()})")
    if not held:
        lines.append("running            nothing")
    problems = recovery_problems(settings.recovery_dir)
    code = 0
    if reset_stream:
        if "stream" in held or any(r.startswith("stream-") for r in held):
            lines.append("stream recovery    not reset: the stream is running; stop it first")
            return lines, 1
        with contextlib.suppress(FileNotFoundError):
            removed = reset_recovery(settings)
            lines.append(
                "stream recovery    reset"
                + ("" if removed else " (there was none)")
                + "; the next stream start replays the event log from its oldest record"
                " (Delta appends skip rows already written, online features are recomputed)"
            )
        lines.extend(_replay_caveat(settings))
        return lines, 0
    if problems:
        code = 1
        for problem in problems:
            lines.append(f"stream recovery    BROKEN: {problem}")
        lines.append("                   fix: nextbest doctor --reset-stream")
    else:
        parts = len(list(settings.recovery_dir.glob("part-*.sqlite3")))
        lines.append(f"stream recovery    ok ({parts} partitions)")
    return lines, code


def _replay_caveat(settings: Settings) -> list[str]:
    """A replay rebuilds stream state only from what the log still holds."""
    if settings.kafka_bootstrap:
        return [
            "                   (Kafka: the replay starts at the topic's earliest retained offset)"
        ]
    log = EventLog.from_settings(settings, mode="reader")
    try:
        trimmed = sum(log.start_offsets().values())
    finally:
        log.close()
    if not trimmed:
        return []
    return [
        f"                   warning: {trimmed} records were trimmed from the event log; "
        "windowed features are rebuilt from the records that remain"
    ]
