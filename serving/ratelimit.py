"""Per-client rate limiting: a token bucket per API key (per client IP when keys are
off), answered with 429 and `Retry-After` when empty.

Only routes that name a key scope (`opt["scope"]`) are limited: probes and scrapers
(/health, /ready, /metrics) and the docs never are. The bucket is keyed by the key id
parsed from the `X-API-Key` header, before the key is verified, so a flood is refused
without touching the key store; a client that invents key ids gets 401s from
`serving.keys.KeyMiddleware` instead (whose cache bounds what those cost).

Runs on the event loop only, so the buckets need no lock. Each bucket is two floats;
the table is bounded (`max_clients`) by dropping the buckets idle longest, which can
only ever hand a forgotten client a full bucket again.
"""

import math
import time

from litestar.exceptions import TooManyRequestsException
from litestar.types import ASGIApp, Receive, Scope, Send

from serving.keys import HEADER, parse_key, required_scope

DEFAULT_RATE_PER_S = 5000.0
_HEADER_BYTES = HEADER.lower().encode()


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

    def _evict(self, now: float) -> None:
        """Drop the idle-longest half (a full bucket is the same as no bucket)."""
        by_age = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
        for client, _ in by_age[: max(len(by_age) // 2, 1)]:
            del self._buckets[client]


def client_of(scope: Scope) -> str:
    """`key:<key id>` when the request carries a well-formed key, else `ip:<address>`."""
    for name, value in scope.get("headers", ()):
        if name == _HEADER_BYTES:
            parsed = parse_key(value.decode("latin-1"))
            if parsed is not None:
                return f"key:{parsed[0]}"
            break
    client = scope.get("client")
    return f"ip:{client[0] if client else 'unknown'}"


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
