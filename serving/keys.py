"""API keys: created once, stored hashed, checked on every request with a short cache.

A key reads `nb_<key_id>_<secret>`. The store keeps `key_id`, the scopes and
`sha256$<salt>$<hex of sha256(salt + secret)>`: the secret is 256 random bits, so a
salted fast hash is enough (slow KDFs exist for low-entropy passwords) and checking
costs microseconds. Verified keys are cached for `ttl_s` seconds, which bounds how long
a revoked key keeps working; the cache holds hashes only, never a secret. A revocation
also replaces `<home>/run/keys.epoch` (`announce_revocation`), and every API process of
the home drops its cache when it sees that file change (one `stat` per request), so
on this machine a revoked key is refused at once by whichever worker gets it.

Scopes: `ingest` (POST /v1/events), `decide` (decide, feedback, feature reads),
`admin` (erasure; implies every other scope).

A client address whose authentications keep failing (invented key ids, a guessed
secret) is answered 429 for a while (`failures`: a token bucket per address, one
token per failure), before any store read; a verified key's id is left in the ASGI
scope (`KEY_ID_SCOPE`) for the rate limiter, which keys its buckets on it.
"""

import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio.to_thread
from litestar.exceptions import (
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
)
from litestar.types import ASGIApp, Receive, Scope, Send

from storage.online.store import OnlineStore

if TYPE_CHECKING:  # serving.ratelimit imports this module
    from serving.ratelimit import Buckets

SCOPES = ("ingest", "decide", "admin")
HEADER = "X-API-Key"
_PREFIX = "nb"
KEY_ID_SCOPE = "nextbest.key_id"
"""ASGI scope entry holding the verified key id (set by `KeyMiddleware`)."""
EPOCH_FILE = "keys.epoch"
"""Under `Settings.run_dir`: replaced on every revocation."""


def announce_revocation(run_dir: Path) -> None:
    """Make every running API process of this home forget the keys it verified."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{EPOCH_FILE}.{os.getpid()}"
    tmp.write_text(secrets.token_hex(8))
    os.replace(tmp, run_dir / EPOCH_FILE)  # a new inode: seen even within one mtime tick


def _signature(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}{secret}".encode()).hexdigest()


def hash_secret(secret: str, *, salt: str | None = None) -> str:
    salt = salt if salt is not None else secrets.token_hex(16)
    return f"sha256${salt}${_digest(salt, secret)}"


def check_secret(stored: str, secret: str) -> bool:
    try:
        algo, salt, digest = stored.split("$", 2)
    except ValueError:
        return False
    return algo == "sha256" and hmac.compare_digest(digest, _digest(salt, secret))


def parse_key(key: str) -> tuple[str, str] | None:
    parts = key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != _PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def create_key(store: OnlineStore, scopes: Sequence[str]) -> str:
    """Create a key with these scopes and return it; only its hash is stored."""
    wanted = list(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    unknown = sorted(set(wanted) - set(SCOPES))
    if not wanted or unknown:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {list(scopes)}")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32).replace("_", "-")
    store.create_api_key(key_id, hash_secret(secret), wanted)
    return f"{_PREFIX}_{key_id}_{secret}"


class KeyVerifier:
    """Turns an `X-API-Key` header into scopes, or raises 401."""

    def __init__(
        self, store: OnlineStore, *, ttl_s: float = 30.0, epoch: Path | None = None
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.epoch = epoch
        self._seen = _signature(epoch)
        self._cache: dict[str, tuple[float, str | None, tuple[str, ...]]] = {}

    def _check_epoch(self) -> None:
        """Drop the cache when a revocation was announced since the last look."""
        if self.epoch is None:
            return
        now = _signature(self.epoch)
        if now != self._seen:
            self._cache.clear()
            self._seen = now

    def scopes(self, key: str | None) -> tuple[str, ...]:
        """Sync (it may read the store): call from a worker thread on a cache miss."""
        parsed = parse_key(key) if key else None
        if parsed is None:
            raise NotAuthorizedException(f"missing or malformed {HEADER} header")
        key_id, secret = parsed
        self._check_epoch()
        hit = self._cache.get(key_id)
        now = time.monotonic()
        if hit is None or now - hit[0] > self.ttl_s:
            record = self.store.get_api_key(key_id)
            stored = None if record is None or record.revoked else record.hashed_secret
            hit = (now, stored, tuple(record.scopes) if record is not None else ())
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = hit
        _, stored, scopes = hit
        if stored is None or not check_secret(stored, secret):
            raise NotAuthorizedException("invalid or revoked API key")
        return scopes

    def cached(self, key: str | None) -> bool:
        parsed = parse_key(key) if key else None
        if parsed is None:
            return True  # rejected without touching the store
        self._check_epoch()
        hit = self._cache.get(parsed[0])
        return hit is not None and time.monotonic() - hit[0] <= self.ttl_s

    def forget(self) -> None:
        self._cache.clear()


def required_scope(handler: Any) -> str | None:
    opt = getattr(handler, "opt", None) or {}
    scope = opt.get("scope")
    return scope if isinstance(scope, str) else None


class KeyMiddleware:
    """401 without a valid key, 403 when the key lacks the route's `opt["scope"]`.

    An ASGI middleware rather than a Litestar guard: guards receive a copy of the route
    handler on every call (`copy(self)` in `BaseRouteHandler.authorize_connection`),
    which costs more than the check itself on the /v1/decide hot path.
    """

    def __init__(self, app: ASGIApp, failures: "Buckets | None" = None) -> None:
        self.app = app
        self.failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            needed = required_scope(scope.get("route_handler"))
            verifier: KeyVerifier | None = scope["litestar_app"].state.get("key_verifier")
            if needed is not None and verifier is not None:
                key = _header(scope, _HEADER_BYTES)
                address = client_address(scope)
                failures = self.failures
                if failures is not None and (wait := failures.wait(address)) > 0:
                    raise TooManyRequestsException(
                        "too many failed authentications from this address; retry later",
                        headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )
                try:
                    if verifier.cached(key):
                        scopes = verifier.scopes(key)
                    else:
                        scopes = await anyio.to_thread.run_sync(verifier.scopes, key)
                except NotAuthorizedException:
                    if failures is not None:
                        failures.take(address)
                    raise
                parsed = parse_key(key or "")
                if parsed is not None:
                    cast(dict[str, Any], scope)[KEY_ID_SCOPE] = parsed[0]
                if needed not in scopes and "admin" not in scopes:
                    raise PermissionDeniedException(f"this API key lacks the {needed!r} scope")
        await self.app(scope, receive, send)


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


_HEADER_BYTES = HEADER.lower().encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None
