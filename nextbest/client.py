"""Client side of the API: `nextbest replay` and the `--simulate` event generator.

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

import httpx

from nextbest.settings import Settings

MAX_DETAILS = 20
"""Rejected events and failed batches printed one by one before the rest are counted."""


@dataclass
class SendReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    failed_batches: int = 0
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
            f"failed batches {self.failed_batches}, {rate:.0f} events/s"
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


def _batches(events: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def headers(settings: Settings) -> dict[str, str]:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return {"X-API-Key": key} if key else {}


def send_events(
    settings: Settings,
    events: Iterable[Any],
    *,
    rate: float,
    batch_size: int = 50,
    limit: int | None = None,
    stop: Any = None,
) -> SendReport:
    """POST events to /v1/events at `rate` events/s; `stop` is an optional Event-like
    object whose `is_set()` ends the run early."""
    report = SendReport()
    start = time.perf_counter()
    with httpx.Client(base_url=settings.api_url, headers=headers(settings), timeout=30) as http:
        for batch in _batches(events, batch_size):
            if limit is not None and report.sent >= limit:
                break
            if stop is not None and stop.is_set():
                break
            due = start + report.sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            first = report.sent
            try:
                response = http.post("/v1/events", json={"events": batch})
                body = response.json() if response.content else {}
            except httpx.HTTPError as exc:
                report.failed_batches += 1
                report.sent += len(batch)
                report.note(f"batch of events {first + 1}-{report.sent} failed: {exc!r}")
                continue
            except ValueError:
                body = {}
            report.sent += len(batch)
            if response.status_code in (202, 422) and isinstance(body, dict):
                report.accepted += int(body.get("accepted", 0))
                rejected = body.get("rejected", []) or []
                report.rejected += len(rejected)
                for item in rejected:
                    report.note(_rejection(batch, first, item))
            else:
                report.failed_batches += 1
                text = response.text.strip().replace("\n", " ")[:300]
                report.note(
                    f"batch of events {first + 1}-{report.sent} failed: "
                    f"HTTP {response.status_code} {text}"
                )
    report.seconds = time.perf_counter() - start
    return report


def _rejection(batch: list[Any], first: int, item: Any) -> str:
    """`line 7: 'view' events need item_id` (event number when not read from a file)."""
    index = item.get("index") if isinstance(item, dict) else None
    reason = item.get("reason", item) if isinstance(item, dict) else item
    event = batch[index] if isinstance(index, int) and 0 <= index < len(batch) else None
    lineno = getattr(event, "lineno", 0)
    where = f"line {lineno}" if lineno else f"event {first + (index or 0) + 1}"
    return f"rejected {where}: {reason}"


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
