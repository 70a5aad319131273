"""One running instance per data home and role: `<home>/locks/<role>.lock`.

A second `nextbest up`, `api`, `stream` or Dagster daemon on the same home would fight
the first over the event log's writer lock, the port and, worst, the stream's recovery
partitions (two writers leave them unresumable). Each role takes an exclusive `flock`
on its lock file and writes its pid and start time into it; the kernel drops the lock
when the process dies, however it dies, so a stale file never blocks a restart.
"""

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROLES = ("up", "api", "stream", "dagster")
EXIT_LOCKED = 75
"""Exit code of a component that found its role already running (EX_TEMPFAIL); the
supervisor does not restart it."""


@dataclass(frozen=True)
class Holder:
    role: str
    pid: int | None
    started: float | None

    def describe(self) -> str:
        since = (
            datetime.fromtimestamp(self.started, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            if self.started
            else "unknown time"
        )
        return f"pid {self.pid if self.pid is not None else '?'}, since {since}"


class AlreadyRunning(RuntimeError):
    def __init__(self, home: Path, holder: Holder) -> None:
        self.holder = holder
        super().__init__(
            f"nextbest {holder.role} is already running on {home} ({holder.describe()}); "
            f"stop it first, or use another data home (--home / NEXTBEST_HOME)"
        )


def lock_dir(home: Path) -> Path:
    return home / "locks"


def lock_path(home: Path, role: str) -> Path:
    return lock_dir(home) / f"{role}.lock"


def _read(path: Path, role: str) -> Holder:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        data = {}
    pid, started = data.get("pid"), data.get("started")
    return Holder(
        role,
        int(pid) if isinstance(pid, int) else None,
        float(started) if isinstance(started, (int, float)) else None,
    )


class InstanceLock:
    """Held for the life of the process (or until `release`)."""

    def __init__(self, home: Path, role: str) -> None:
        self.home, self.role = home, role
        self.path = lock_path(home, role)
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(5):  # a `holder` probe holds a shared lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    os.close(fd)
                    raise AlreadyRunning(self.home, _read(self.path, self.role)) from None
                time.sleep(0.05)
        record = {"pid": os.getpid(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(home: Path, role: str) -> Holder | None:
    """Who holds `role` on this home, or None when nobody runs it (probes the lock)."""
    path = lock_path(home, role)
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path, role)
    finally:
        os.close(fd)  # closing drops a probe lock we may have taken
    return None


def stream_role(process_id: int | None) -> str:
    """Process 0 of a cluster and a single-process stream share one lock, so a second
    stream of any shape conflicts with the first; the other cluster processes lock
    their own index."""
    return "stream" if not process_id else f"stream-{process_id}"


def running(home: Path) -> dict[str, Holder]:
    """Every role currently held on this home (stream cluster processes included)."""
    found: dict[str, Holder] = {}
    if not lock_dir(home).is_dir():
        return found
    for path in sorted(lock_dir(home).glob("*.lock")):
        held = holder(home, path.stem)
        if held is not None:
            found[path.stem] = held
    return found
