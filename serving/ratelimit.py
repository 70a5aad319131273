"""Per-client rate limiting: a token bucket per API key (per client IP when keys are
off), answered with 429 and `Retry-After` when empty.

Only routes that name a key scope (`opt["scope"]`) are limited: probes and scrapers
(/health, /ready, /metrics) and the docs never are. The limiter runs after
`serving.keys.KeyMiddleware` and keys its bucket on the *verified* key id: a header
naming someone else's key id with a wrong secret is a 401 that never touches that
key's bucket, and invented key ids are counted by the failed-authentication limit of
`KeyMiddleware` (per client address) rather than each getting a fresh bucket.
Rates come from `Settings.rate_limit_per_s` / `rate_limit_burst`, the same for every key.

Runs on the event loop only, so the buckets need no lock. Each bucket is two floats;
the table is bounded (`max_clients`) by dropping the buckets idle longest, which can
only ever hand a forgotten client a full bucket again.
"""

import math
import time

from litestar.exceptions import TooManyRequestsException
from litestar.types import ASGIApp, Receive, Scope, Send

from serving.keys import KEY_ID_SCOPE, client_address, required_scope

DEFAULT_RATE_PER_S = 5000.0


class TokenBuckets:
    """`rate` tokens per second per client, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float, *, max_clients: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}

    def take(self, client: str, now: float | None = None) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        t = time.monotonic() if now is None else now
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._evict(t)
            bucket = self._buckets[client] = [self.burst, t]
        tokens = min(self.burst, bucket[0] + (t - bucket[1]) * self.rate)
        bucket[1] = t
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` has a token (0.0: now), taking none."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        t = time.monotonic() if now is None else now
        tokens = min(self.burst, bucket[0] + (t - bucket[1]) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        """Drop the idle-longest half (a full bucket is the same as no bucket)."""
        by_age = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
        for client, _ in by_age[: max(len(by_age) // 2, 1)]:
            del self._buckets[client]


def client_of(scope: Scope) -> str:
    """`key:<verified key id>` behind `KeyMiddleware`, else `ip:<address>`."""
    key_id = scope.get(KEY_ID_SCOPE)  # type: ignore[misc]
    if isinstance(key_id, str):
        return f"key:{key_id}"
    return f"ip:{client_address(scope)}"


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and required_scope(scope.get("route_handler")) is not None:
            wait = self.buckets.take(client_of(scope))
            if wait > 0:
                raise TooManyRequestsException(
                    "rate limit exceeded; retry later",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        await self.app(scope, receive, send)
