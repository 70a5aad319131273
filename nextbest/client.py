"""Client side of the API: `nextbest replay` and the `--simulate` event generator.

Both send events at a fixed rate in small batches, paced against a schedule (not
"as fast as the server answers"), so a slow server shows up as lag, not as a lower
offered rate.
"""

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from nextbest.settings import Settings


@dataclass
class SendReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    failed_batches: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"sent {self.sent}, accepted {self.accepted}, rejected {self.rejected}, "
            f"failed batches {self.failed_batches}, {rate:.0f} events/s"
        )


def read_jsonl(path: str | Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


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
            try:
                response = http.post("/v1/events", json={"events": batch})
                body = response.json() if response.content else {}
            except (httpx.HTTPError, ValueError):
                report.failed_batches += 1
                report.sent += len(batch)
                continue
            report.sent += len(batch)
            if response.status_code in (202, 422):
                report.accepted += int(body.get("accepted", 0))
                report.rejected += len(body.get("rejected", []))
            else:
                report.failed_batches += 1
    report.seconds = time.perf_counter() - start
    return report


def live_demo_events(*, seed: int) -> Iterator[dict[str, Any]]:
    """Demo shop events re-timed to now, for `nextbest up --simulate`."""
    from nextbest.demo import DemoConfig, iter_events

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
