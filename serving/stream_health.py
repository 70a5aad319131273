"""Whether the stream is alive and caught up, from its status rows (`nb_stream_status`)
and the event log's end offsets; refreshed by the runtime on a timer, never per request.

Down means events are waiting and the stream has not moved forward for
`settings.stream_stale_s` (crashed, crash-looping, hung or never started). An idle,
caught-up stream is up whatever its heartbeat says. On Kafka the log end is the
broker's, unknown here: the lag is reported unknown and only a stale heartbeat counts.
"""

import logging
from dataclasses import dataclass

import sqlalchemy as sa

from nextbest.settings import Settings
from storage.eventlog.log import EventLog
from storage.online.models import now_ms
from storage.online.status import read_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamHealth:
    up: bool
    detail: str  # "ok", or why the stream is down
    lag_events: int | None = None  # None: unknown (Kafka)
    lag_s: float = 0.0  # how long the oldest pending partition has not moved
    heartbeat_age_s: float | None = None  # None: no heartbeat ever
    dead_letters: int = 0


class StreamProbe:
    """Reads the stream's status; one instance per API process."""

    def __init__(self, settings: Settings, engine: sa.Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._started_ms = now_ms()
        self._log: EventLog | None = None

    def _ends(self) -> tuple[dict[int, int], dict[int, int]] | None:
        if self._settings.kafka_bootstrap:
            return None
        if self._log is None:
            self._log = EventLog.from_settings(self._settings, mode="reader")
        return self._log.start_offsets(), self._log.end_offsets()

    def check(self) -> StreamHealth:
        now = now_ms()
        status = read_status(self._engine)
        stale_ms = self._settings.stream_stale_s * 1000
        beat = max((s.heartbeat_ms for s in status.values()), default=None)
        age = None if beat is None else max(0, now - beat) / 1000
        dead = sum(s.dead_letters for s in status.values())
        ends = self._ends()
        if ends is None:  # Kafka: only the heartbeat can tell
            if beat is not None and now - beat > stale_ms:
                return StreamHealth(
                    False, f"down: no heartbeat for {age:.0f} s", None, 0.0, age, dead
                )
            return StreamHealth(True, "ok", None, 0.0, age, dead)
        starts, end_offsets = ends
        lag = 0
        since = now
        for p, end in end_offsets.items():
            row = status.get(p)
            read = max(row.next_offset if row is not None else 0, starts.get(p, 0))
            if end > read:
                lag += end - read
                # A partition never seen has been pending at least since this API started.
                since = min(since, row.progress_ms if row is not None else self._started_ms)
        lag_s = (now - since) / 1000 if lag else 0.0
        if lag and now - since > stale_ms:
            beat_text = "no heartbeat" if age is None else f"heartbeat {age:.0f} s ago"
            detail = f"down: {lag} events pending, no progress for {lag_s:.0f} s ({beat_text})"
            return StreamHealth(False, detail, lag, lag_s, age, dead)
        return StreamHealth(True, "ok", lag, lag_s, age, dead)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
