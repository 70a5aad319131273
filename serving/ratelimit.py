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

With several API processes (`settings.api_workers` > 1) the buckets are one table in a
file under `<home>/run/` that every worker maps (`SharedTokenBuckets`), so the
configured rate is the API's, not each worker's: neither N times it nor a share that
depends on which worker the kernel hands a connection to.
"""

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

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


_SLOT = struct.Struct("<Qdd")  # client hash (0: free), tokens, last update (monotonic s)
_PROBE = 32


class SharedTokenBuckets:
    """`TokenBuckets` for every process that maps the same file (one host: the
    monotonic clock is the machine's). An open-addressing table of `slots` buckets
    keyed by a 64-bit hash of the client, under an exclusive `flock` for the few
    microseconds of a take; a client that finds no free slot among its `_PROBE`
    replaces the idlest one (which then starts full again, as after an eviction)."""

    def __init__(self, path: Path, rate: float, burst: float, *, slots: int = 1 << 16) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.slots = rate, burst, slots
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = slots * _SLOT.size
        with self._locked():
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, 0)  # another table shape: start empty
                os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, client: str, now: float) -> tuple[int, float]:
        """(slot, tokens now) of `client`, claiming a slot for a new one."""
        h = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest()) or 1
        start, idlest, idle_t = h % self.slots, -1, math.inf
        for i in range(_PROBE):
            slot = (start + i) % self.slots
            key, tokens, t = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if key == h:
                elapsed = now - t
                if elapsed < 0:  # written before a reboot restarted the clock
                    return slot, self.burst
                return slot, min(self.burst, tokens + elapsed * self.rate)
            if key == 0:
                idlest, idle_t = slot, -math.inf
                break
            if t < idle_t:
                idlest, idle_t = slot, t
        _SLOT.pack_into(self._map, idlest * _SLOT.size, h, self.burst, now)
        return idlest, self.burst

    def take(self, client: str, now: float | None = None) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        t = time.monotonic() if now is None else now
        with self._locked():
            slot, tokens = self._find(client, t)
            h = _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]
            left = tokens - 1.0 if tokens >= 1.0 else tokens
            _SLOT.pack_into(self._map, slot * _SLOT.size, h, left, t)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` has a token (0.0: now), taking none."""
        t = time.monotonic() if now is None else now
        with self._locked():
            _slot, tokens = self._find(client, t)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


Buckets = TokenBuckets | SharedTokenBuckets


def buckets_for(run_dir: Path, name: str, rate: float, burst: float, *, workers: int) -> Buckets:
    """In-memory buckets for one API process, the shared table for several."""
    if workers <= 1:
        return TokenBuckets(rate, burst)
    return SharedTokenBuckets(run_dir / f"ratelimit-{name}.bin", rate, burst)


def client_of(scope: Scope) -> str:
    """`key:<verified key id>` behind `KeyMiddleware`, else `ip:<address>`."""
    key_id = scope.get(KEY_ID_SCOPE)  # type: ignore[misc]
    if isinstance(key_id, str):
        return f"key:{key_id}"
    return f"ip:{client_address(scope)}"


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, buckets: Buckets) -> None:
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
