"""When the client tries again, and how long it waits.

Retried: 429 (waiting what `Retry-After` says), 502, 503, 504, and transport errors
(refused or dropped connections, timeouts). A request that may have been applied
before its answer was lost (a read timeout, a connection closed mid-answer) is retried
only when repeating it is harmless: events carry ids fixed before the first attempt,
which the stream deduplicates (`pipelines/dedupe.py`), reads and erasures are
idempotent. Feedback has no id, so it is retried only when it surely did not arrive.
"""

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_DELIVERED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before the request reached the server."""


class NextbestError(Exception):
    """Base of the client's errors."""


class ApiError(NextbestError):
    """The API answered with an error status (after any retries)."""

    def __init__(self, status_code: int, detail: str, body: object = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.body = body
        super().__init__(f"HTTP {status_code}: {detail}")


class ApiUnreachable(NextbestError):
    """No answer after every retry (connection refused or dropped, timeouts)."""

    def __init__(self, message: str, retries: int = 0) -> None:
        self.retries = retries
        super().__init__(message)


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` attempts after the first; exponential backoff from `backoff` seconds,
    capped at `max_backoff`, with full jitter so many clients do not retry in step.
    `Retry-After` is honoured up to `max_retry_after` seconds."""

    retries: int = 5
    backoff: float = 0.2
    max_backoff: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        after = retry_after(response) if response is not None else None
        if after is not None:
            return min(after, self.max_retry_after)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    def retryable(self, outcome: httpx.Response | Exception, *, idempotent: bool) -> bool:
        if isinstance(outcome, httpx.Response):
            if outcome.status_code in (429, 503):
                return True  # refused, or the log did not take it: nothing was stored
            return idempotent and outcome.status_code in RETRY_STATUSES
        if isinstance(outcome, NOT_DELIVERED):
            return True
        return idempotent and isinstance(outcome, httpx.TransportError)


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
