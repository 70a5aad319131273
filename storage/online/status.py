"""The stream's status rows (`nb_stream_status`): written by the stream worker every
few seconds, read by the API to tell whether the stream is alive and caught up."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from storage.online.engine import write_engine
from storage.online.models import STATUS
from storage.online.sql import upsert


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    next_offset: int  # the next source offset the stream will read
    dead_letters: int  # records of this partition the stream dead-lettered, in total
    heartbeat_ms: int  # when the worker was last seen alive (wall clock, epoch ms)
    progress_ms: int  # when next_offset last moved


def write_status(
    engine: sa.Engine, rows: Iterable[PartitionStatus], *, update: Sequence[str] | None = None
) -> None:
    """Upsert one row per partition (one transaction). `update` limits what an existing
    row takes: in a cluster, the process reading a partition owns its offsets and the
    one writing its Delta appends owns its dead-letter count."""
    params = [
        {
            "partition": r.partition,
            "next_offset": r.next_offset,
            "dead_letters": r.dead_letters,
            "heartbeat_ms": r.heartbeat_ms,
            "progress_ms": r.progress_ms,
        }
        for r in rows
    ]
    if not params:
        return
    columns = [c for c in (update or params[0]) if c != "partition"]
    with write_engine(engine).begin() as conn:
        upsert(conn, STATUS, params, update=columns)


def read_status(engine: sa.Engine) -> dict[int, PartitionStatus]:
    """partition -> its status row (empty when no stream ever ran)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(STATUS)).mappings().all()
    return {int(r["partition"]): PartitionStatus(**{k: int(v) for k, v in r.items()}) for r in rows}
