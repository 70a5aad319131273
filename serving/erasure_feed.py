"""Erasure news between API worker processes: which actors to drop from memory.

`DELETE /v1/users/{id}` erases the API's in-memory traces of the person (queued
decision records, cached answers, consent answers, freshness bookkeeping) at once in
the worker that took it. With several workers (`settings.api_workers` > 1) the others
learn it from `<home>/run/erasures.feed` within their refresh interval: a counter and a
ring of slots, each an actor encrypted with a keystream from the pseudonymization key
(blake2b keyed, a random nonce per slot), never the id in clear, because the
erasure's final scan of the home must find no byte of it. The announcing worker wipes
its slots before that scan, after the siblings had time to read them.
"""

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from nextbest.settings import Settings
from serving.runtime import ServingRuntime

FEED_FILE = "erasures.feed"
SLOTS = 256
READ_WINDOW_S = 10.0
"""How long an announcement stays readable before its worker may wipe it (the other
workers read the feed every refresh interval, 2 s)."""
_HEAD = struct.Struct("<Q")  # announcements so far
_META = struct.Struct("<Q16sH")  # sequence number + 1 (0: empty), nonce, length
_MAX = 1024  # bytes of one actor (ids are bounded far below)
_SLOT = _META.size + _MAX


def _keystream(key: bytes, nonce: bytes, n: int) -> bytes:
    blocks = (
        hashlib.blake2b(nonce + i.to_bytes(4, "big"), key=key[:64]).digest()
        for i in range((n + 63) // 64)
    )
    return b"".join(blocks)[:n]


def _xor(data: bytes, stream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, stream, strict=True))


class ErasureFeed:
    """No file (one API process): announcing and reading are no-ops."""

    def __init__(self, path: Path | None, key: bytes) -> None:
        self.key = key or b"nextbest"
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            size = _HEAD.size + SLOTS * _SLOT
            with self._flocked():
                if os.fstat(self._fd).st_size != size:
                    os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        self._seen = self._head()

    def _head(self) -> int:
        return 0 if self._map is None else _HEAD.unpack_from(self._map)[0]

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        assert self._fd is not None
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def announce(self, actors: Iterable[str]) -> list[int]:
        """Tell the other workers; returns the slots' sequence numbers (for `wipe`)."""
        if self._map is None:
            return []
        seqs: list[int] = []
        with self._flocked():
            for actor in actors:
                raw = actor.encode()[:_MAX]
                seq, nonce = self._head(), secrets.token_bytes(16)
                at = _HEAD.size + (seq % SLOTS) * _SLOT
                _META.pack_into(self._map, at, seq + 1, nonce, len(raw))
                end = at + _META.size + len(raw)
                self._map[at + _META.size : end] = _xor(raw, _keystream(self.key, nonce, len(raw)))
                _HEAD.pack_into(self._map, 0, seq + 1)
                if self._seen == seq:  # this process forgot them already
                    self._seen = seq + 1
                seqs.append(seq)
        return seqs

    def news(self) -> list[str]:
        """Actors announced by other workers since the last call (a slot overwritten or
        wiped before it was read is skipped)."""
        if self._map is None or self._head() == self._seen:
            return []
        out: list[str] = []
        with self._flocked():
            head = self._head()
            for seq in range(max(self._seen, head - SLOTS), head):
                at = _HEAD.size + (seq % SLOTS) * _SLOT
                tag, nonce, n = _META.unpack_from(self._map, at)
                if tag != seq + 1:
                    continue
                data = bytes(self._map[at + _META.size : at + _META.size + n])
                out.append(_xor(data, _keystream(self.key, nonce, n)).decode(errors="replace"))
            self._seen = head
        return out

    def wipe(self, seqs: Iterable[int]) -> None:
        """Zero these announcements' slots (unless reused since)."""
        if self._map is None:
            return
        with self._flocked():
            for seq in seqs:
                at = _HEAD.size + (seq % SLOTS) * _SLOT
                if _META.unpack_from(self._map, at)[0] == seq + 1:
                    self._map[at : at + _SLOT] = bytes(_SLOT)


_FEEDS: dict[Path | None, ErasureFeed] = {}
_FEEDS_LOCK = threading.Lock()


def erasure_feed(settings: Settings) -> ErasureFeed:
    """This process's feed for the home (a file only with several API processes)."""
    path = settings.run_dir / FEED_FILE if settings.api_workers > 1 else None
    with _FEEDS_LOCK:
        feed = _FEEDS.get(path)
        if feed is None:
            key = settings.pseudonymization_key.get_secret_value().encode()
            feed = _FEEDS[path] = ErasureFeed(path, key)
        return feed


def forget_announced(runtime: ServingRuntime) -> int:
    """Drop from this process's memory the actors another worker erased (run by the
    refresh loop); returns how many."""
    actors = erasure_feed(runtime.settings).news()
    for actor in actors:
        runtime.decision_log.forget(actor)
        runtime.metrics.forget(actor)
        runtime.answers.forget(actor)
    if actors and runtime.consent is not None:
        runtime.consent.forget(actors)
    return len(actors)


def wipe_when_read(settings: Settings, seqs: list[int], announced_at: float) -> None:
    """Wipe the announcements once the other workers had `READ_WINDOW_S` to read them
    (blocks the erasure's background thread, never a request)."""
    if not seqs:
        return
    time.sleep(max(0.0, announced_at + READ_WINDOW_S - time.monotonic()))
    erasure_feed(settings).wipe(seqs)
