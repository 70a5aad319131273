"""`nextbest replay` and the `--simulate` event generator, on `Client`.

Both send events at a fixed rate in small batches, paced against a schedule (not
"as fast as the server answers"), so a slow server shows up as lag, not as a lower
offered rate.
"""

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nextbest.client.protocol import batches
from nextbest.client.results import Rejection, SendResult
from nextbest.client.retry import RetryPolicy
from nextbest.client.sync import Client
from nextbest.settings import Settings

MAX_DETAILS = 20
"""Rejected events and failed batches printed one by one before the rest are counted."""


@dataclass
class SendReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    failed_batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    def note(self, problem: str) -> None:
        if len(self.problems) < MAX_DETAILS:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    def details(self) -> list[str]:
        """Why events were rejected and batches failed, capped at MAX_DETAILS lines."""
        more = [f"... and {self.more_problems} more"] if self.more_problems else []
        return [*self.problems, *more]

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"sent {self.sent}, accepted {self.accepted}, rejected {self.rejected}, "
            f"failed batches {self.failed_batches}, retries {self.retries}, {rate:.0f} events/s"
        )


class Line(dict[str, Any]):
    """An event read from a file, remembering its line number for error messages."""

    lineno: int = 0


class RawLine(str):
    """A line that is not a JSON object, sent as a string for the API to reject."""

    lineno: int = 0


def check_jsonl(path: str | Path) -> str | None:
    """Why `path` cannot be replayed (missing, a directory, unreadable), or None."""
    p = Path(path)
    if not p.exists():
        return f"{path}: no such file"
    if not p.is_file():
        return f"{path}: not a file"
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror})"
    return None


def read_jsonl(path: str | Path) -> Iterator[Any]:
    """Events of a JSONL file; a line that is not a JSON object is sent as it is (the
    API rejects it with a reason) so one bad line never stops a replay."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError:
                data = line.strip()
            event = Line(data) if isinstance(data, dict) else RawLine(line.strip())
            event.lineno = number
            yield event


def send_events(
    settings: Settings,
    events: Iterable[Any],
    *,
    rate: float,
    batch_size: int = 50,
    limit: int | None = None,
    stop: Any = None,
    retry: RetryPolicy | None = None,
) -> SendReport:
    """POST events to /v1/events at `rate` events/s through `Client` (so each event has
    its id before the first attempt and a batch is retried on 429/503/lost
    connections, never stored twice); `stop` is an optional Event-like object whose
    `is_set()` ends the run early. A batch still failing after its retries is counted
    and named, and the run goes on."""
    report = SendReport()
    start = time.perf_counter()
    with Client.from_settings(settings, timeout=30, retry=retry) as client:
        for batch in batches(events, batch_size):
            if limit is not None and report.sent >= limit:
                break
            if stop is not None and stop.is_set():
                break
            due = start + report.sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            first = report.sent
            result = SendResult()
            client.send_batch(batch, result)
            report.sent += len(batch)
            report.accepted += result.accepted
            report.rejected += len(result.rejected)
            report.retries += result.retries
            for rejection in result.rejected:
                report.note(_rejection(batch, first, rejection))
            for failed in result.failed:
                report.failed_batches += 1
                report.note(f"batch of events {first + 1}-{report.sent} failed: {failed.reason}")
    report.seconds = time.perf_counter() - start
    return report


def _rejection(batch: list[Any], first: int, rejection: Rejection) -> str:
    """`line 7: 'view' events need item_id` (event number when not read from a file)."""
    index = rejection.index
    event = batch[index] if 0 <= index < len(batch) else None
    lineno = getattr(event, "lineno", 0)
    where = f"line {lineno}" if lineno else f"event {first + index + 1}"
    return f"rejected {where}: {rejection.reason}"


def live_demo_events(*, seed: int) -> Iterator[dict[str, Any]]:
    """Demo shop events re-timed to now, for `nextbest up --simulate`."""
    from nextbest.demo.shop import DemoConfig, iter_events

    cfg = DemoConfig.small().replace(seed=seed, n_events=10_000_000, days=365)
    first: float | None = None
    wall0 = time.time()
    for event in iter_events(cfg):
        data = json.loads(event.to_json())
        ts = event.ts.timestamp()
        first = ts if first is None else first
        # one simulated hour per real second, never in the past; send_events paces them
        data["ts"] = datetime.fromtimestamp(
            max(time.time(), wall0 + (ts - first) / 3600), tz=UTC
        ).isoformat()
        data["event_id"] = f"sim-{seed}-{data['event_id']}"
        yield data
