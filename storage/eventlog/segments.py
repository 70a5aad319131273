"""Segment files of the embedded event log: record framing, scanning, layout, reading.

Split from `storage.eventlog.log` (which holds the writer and the public `EventLog`) to keep
modules small; import the public names from there.

A record is ``crc32 | body_len | offset | key_len | key | payload`` (little endian, the
CRC covers everything after itself). Keeping the offset in each record lets erasure
drop records without renumbering the rest: offsets may have gaps but are never reused.
"""

import bisect
import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQH")  # crc, body_len, offset, key_len
_BODY_PREFIX = struct.Struct("<IQH")
_FORMAT = 1
_META = "eventlog.json"
_SUFFIX = ".log"
_CHUNK = 1 << 20
TMP_SUFFIX = ".rewrite"
QUARANTINE_DIR = "quarantine"
MAX_KEY_BYTES = 0xFFFF
MAX_PAYLOAD_BYTES = 1 << 30


class EventLogError(RuntimeError):
    """Base error of the embedded event log."""


class WriterLockedError(EventLogError):
    """Another process (or handle) already writes this log."""


class CorruptLogError(EventLogError):
    """A sealed segment has an unreadable record: data damage, not a crash tail."""


def partition_for(key: str, partitions: int) -> int:
    """Stable across processes and runs (Python's `hash()` is salted per process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def encode(offset: int, key: bytes, payload: bytes) -> bytes:
    body = _BODY_PREFIX.pack(len(key) + len(payload), offset, len(key))
    crc = zlib.crc32(payload, zlib.crc32(key, zlib.crc32(body)))
    return struct.pack("<I", crc) + body + key + payload


Skipped = Callable[[int, int, bytes], None]
"""on_skip(byte position, offset of the last good record before it, the bad bytes)."""
_RESYNC_WINDOWS = 16  # offset gaps (erased records) up to 16 * 65536 are bridged


class Scan:
    """Iterate the complete, CRC-valid records (offset, key, payload) of a segment.

    Runs from byte `pos` (whose record has an offset > `after`) to the file size seen at
    start, stopping before the first offset >= `limit` (`limited` True). A record that
    fails its checks (a flipped bit, a bad length) is skipped: the scan resyncs on the
    next record that passes them (`resync`) and reports the bad bytes to `on_skip`.
    When no good record follows, the bad bytes are the tail: with `tail` (the segment
    being written; a crash's torn tail) the scan stops there (`clean` False); else they
    are reported skipped too. `pos` is then the end of the last record yielded (or
    skipped) and `last` the offset of the last record yielded.
    """

    def __init__(
        self,
        fd: int,
        pos: int,
        *,
        after: int,
        limit: int | None = None,
        tail: bool = True,
        on_skip: Skipped | None = None,
    ) -> None:
        self.fd, self.pos, self.last, self.limit = fd, pos, after, limit
        self.size = os.fstat(fd).st_size
        self.clean, self.limited = True, False
        self.tail, self.on_skip, self.skipped = tail, on_skip, 0

    def __iter__(self) -> Iterator[tuple[int, bytes, bytes]]:
        buf, start = b"", self.pos  # buf holds file bytes from `start`
        hsize = HEADER.size
        while self.pos < self.size:
            i = self.pos - start
            if len(buf) - i < hsize:
                buf, start, i = os.pread(self.fd, _CHUNK, self.pos), self.pos, 0
            record = _check(buf, i, self.last) if len(buf) - i >= hsize else None
            if record is None and len(buf) - i >= hsize:
                _crc, body_len, offset, key_len = HEADER.unpack_from(buf, i)
                n = hsize + body_len
                if key_len <= body_len and offset > self.last and self.pos + n <= self.size:
                    if len(buf) - i < n:
                        buf, start, i = os.pread(self.fd, max(n, _CHUNK), self.pos), self.pos, 0
                    record = _check(buf, i, self.last)
            if record is None:
                if not self._skip():
                    self.clean = False
                    return
                buf, start = b"", self.pos
                continue
            offset, n, key_len = record
            if self.limit is not None and offset >= self.limit:
                self.limited = True
                return
            view = memoryview(buf)[i : i + n]
            self.pos += n
            self.last = offset
            yield offset, bytes(view[hsize : hsize + key_len]), bytes(view[hsize + key_len :])

    def _skip(self) -> bool:
        """Resync after a bad record at `pos`; False: nothing good follows and it is the
        tail of a segment being written (stop there)."""
        rest = os.pread(self.fd, self.size - self.pos, self.pos)
        found = resync(rest, self.last)
        if found is None:
            if self.tail:
                return False
            found = len(rest)
        if self.on_skip is not None:
            self.on_skip(self.pos, self.last, rest[:found])
        self.skipped += 1
        self.pos += found
        return True


def _check(buf: bytes, i: int, last: int) -> tuple[int, int, int] | None:
    """(offset, record length, key length) of a valid record at buf[i:], or None."""
    if len(buf) - i < HEADER.size:
        return None
    crc, body_len, offset, key_len = HEADER.unpack_from(buf, i)
    n = HEADER.size + body_len
    if key_len > body_len or offset <= last or len(buf) - i < n:
        return None
    if zlib.crc32(memoryview(buf)[i + 4 : i + n]) != crc:
        return None
    return offset, n, key_len


def resync(data: bytes, last: int) -> int | None:
    """Position (> 0) of the first valid record in `data` with an offset above `last`.

    The format has no sync marker, and needs none: a record is found again by its own
    CRC-32 over header and body, which random bytes pass with odds of 1 in 4 billion,
    and its offset must continue the partition's (above `last`, within 16 * 65536). The
    candidates are the places whose offset field has the upper six bytes of such an
    offset, found with `bytes.find`, so a 64 MiB segment resyncs in milliseconds."""
    best: int | None = None
    first = (last + 1) >> 16
    for window in range(first, first + _RESYNC_WINDOWS):
        upper = struct.pack("<Q", window << 16)[2:]
        at = data.find(upper, 11)  # offset field starts 8 bytes in; upper part at +10
        while at != -1 and (best is None or at - 10 < best):
            p = at - 10
            if p >= 1 and _check(data, p, last) is not None:
                best = p
                break
            at = data.find(upper, at + 1)
    return best


def sealed_records(
    fd: int, base: int, *, on_skip: Skipped | None = None
) -> Iterator[tuple[int, bytes, bytes]]:
    """All readable records of a segment no writer appends to; damaged ones are
    skipped (and reported to `on_skip`), never fatal."""
    yield from Scan(fd, 0, after=base - 1, tail=False, on_skip=on_skip)


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths of one log directory, and fsync helpers that honour `fsync=False`."""

    path: Path
    partitions: int
    fsync: bool

    def ensure(self, *, writer: bool) -> None:
        """Create or check the metadata file and partition folders."""
        meta = self.path / _META
        if not meta.exists():
            tmp = self.path / f".{_META}.{os.getpid()}.{threading.get_ident()}"
            tmp.write_text(json.dumps({"format": _FORMAT, "partitions": self.partitions}))
            with contextlib.suppress(FileExistsError):  # link never replaces: first one wins
                os.link(tmp, meta)
            tmp.unlink()
        data = json.loads(meta.read_text())
        if data.get("format") != _FORMAT:
            raise EventLogError(f"{meta}: unsupported event log format {data.get('format')!r}")
        if data.get("partitions") != self.partitions:
            raise EventLogError(
                f"{self.path} was created with {data.get('partitions')} partitions but opened "
                f"with {self.partitions}; the partition count is fixed at creation"
            )
        for p in range(self.partitions):
            self.partition_dir(p).mkdir(exist_ok=True)
        if writer:
            self.sync_dir(self.path)

    def partition_dir(self, p: int) -> Path:
        return self.path / f"p{p:04d}"

    def segment_path(self, p: int, base: int) -> Path:
        return self.partition_dir(p) / f"{base:020d}{_SUFFIX}"

    def bases(self, p: int) -> list[int]:
        """Base offsets of the partition's segments, oldest first."""
        names = os.listdir(self.partition_dir(p))
        stems = (n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX))
        return sorted(int(s) for s in stems if s.isdigit())

    def create_segment(self, p: int, base: int) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
        fd = os.open(self.segment_path(p, base), flags, 0o644)
        self.sync_dir(self.partition_dir(p))
        return fd

    def sync(self, fd: int) -> None:
        if self.fsync:
            os.fdatasync(fd)

    def sync_dir(self, path: Path) -> None:
        if self.fsync:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass(slots=True)
class _Cursor:
    """Position cache: the next record at `pos` of segment `base` has offset >= `offset`."""

    base: int
    ino: int
    offset: int
    pos: int


@dataclass(slots=True)
class SegmentReader:
    """Reads with one open handle and cached positions per partition.

    Handles are checked against the path's inode on every call, so a segment replaced by
    an erasure rewrite is reopened and its stale positions dropped. Not thread-safe: the
    owner serializes calls with `lock`.
    """

    layout: Layout
    lock: threading.Lock = field(default_factory=threading.Lock)
    quarantine: "Quarantine | None" = None
    _fds: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # p -> base, fd, ino
    _cursors: dict[int, _Cursor] = field(default_factory=dict)
    _ends: dict[int, _Cursor] = field(default_factory=dict)

    def read(
        self, p: int, offset: int, max_records: int, limit: int | None
    ) -> list[tuple[int, str, bytes]]:
        bases = self.layout.bases(p)
        idx = max(bisect.bisect_right(bases, offset) - 1, 0)
        out: list[tuple[int, str, bytes]] = []
        while idx < len(bases) and len(out) < max_records:
            base = bases[idx]
            fd, ino = self._fd(p, base)
            cur = self._cursors.get(p)
            is_last = idx == len(bases) - 1
            on_skip = self.quarantine.sink(p, base) if self.quarantine is not None else None
            if cur is not None and (cur.base, cur.ino) == (base, ino) and cur.offset <= offset:
                scan = Scan(
                    fd, cur.pos, after=cur.offset - 1, limit=limit, tail=is_last, on_skip=on_skip
                )
            else:
                scan = Scan(fd, 0, after=base - 1, limit=limit, tail=is_last, on_skip=on_skip)
            for rec_offset, key, payload in scan:
                if rec_offset >= offset:
                    out.append((rec_offset, key.decode(), payload))
                    if len(out) >= max_records:
                        break
            self._cursors[p] = _Cursor(base, ino, scan.last + 1, scan.pos)
            if scan.limited or len(out) >= max_records:
                break
            if not scan.clean:
                break  # the tail being written, or a crash tail the writer will cut
            idx += 1
        return out

    def end(self, p: int) -> int:
        """Next offset after the last complete record, scanning only the new tail bytes."""
        bases = self.layout.bases(p)
        if not bases:
            return 0
        base = bases[-1]
        fd, ino = self._fd(p, base)
        cur = self._ends.get(p)
        if cur is None or (cur.base, cur.ino) != (base, ino):
            cur = _Cursor(base, ino, base, 0)
        on_skip = self.quarantine.sink(p, base) if self.quarantine is not None else None
        scan = Scan(fd, cur.pos, after=cur.offset - 1, on_skip=on_skip)
        for _ in scan:
            pass
        self._ends[p] = _Cursor(base, ino, scan.last + 1, scan.pos)
        return scan.last + 1

    def reset(self) -> None:
        """Forget handles and positions (after trim/rewrite); caller holds `lock`."""
        for _, fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cursors.clear()
        self._ends.clear()

    def _fd(self, p: int, base: int) -> tuple[int, int]:
        path = self.layout.segment_path(p, base)
        ino = os.stat(path).st_ino  # FileNotFoundError: trimmed meanwhile, caller retries
        cached = self._fds.get(p)
        if cached is not None and cached[0] == base and cached[2] == ino:
            return cached[1], ino
        if cached is not None:
            os.close(cached[1])
            del self._fds[p]
        fd = os.open(path, os.O_RDONLY)
        ino = os.fstat(fd).st_ino
        self._fds[p] = (base, fd, ino)
        return fd, ino


@dataclass(slots=True)
class Quarantine:
    """Damaged bytes a scan skipped, one file each under `<log>/quarantine/`, named by
    partition, segment, byte position and the offset of the last good record before
    them: `p0000-00000000000000000000-at000000001234-after17.bad`. Idempotent (every
    reader of the segment skips the same bytes), so a file is written once; `seen`
    lists them (an operator inspects, an erasure deletes those naming a person)."""

    path: Path
    _known: set[str] = field(default_factory=set)

    def sink(self, p: int, base: int) -> Skipped:
        return lambda pos, last, raw: self.put(p, base, pos, last, raw)

    def put(self, p: int, base: int, pos: int, last: int, raw: bytes) -> None:
        name = f"p{p:04d}-{base:020d}-at{pos:012d}-after{last}.bad"
        if name in self._known:
            return
        target = self.path / name
        try:
            self.path.mkdir(exist_ok=True)
            if not target.exists():
                tmp = self.path / f".{name}.{os.getpid()}.{threading.get_ident()}"
                tmp.write_bytes(raw)
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, target)
                tmp.unlink()
            self._known.add(name)
            log.error(
                "event log partition %d segment %d: %d damaged bytes at byte %d (after offset "
                "%d) skipped, quarantined in %s",
                p, base, len(raw), pos, last, target,
            )  # fmt: skip
        except OSError:
            log.exception("could not quarantine damaged event log bytes")

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.bad")) if self.path.is_dir() else []


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
