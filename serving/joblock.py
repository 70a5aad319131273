"""Which API process runs an erasure job's hand-over: the one holding its file lock.

With several API processes a job is started by the worker that took the DELETE, and a
worker that starts later (uvicorn restarts one that died) resumes the unfinished
jobs. Without a claim it would resume jobs a live sibling is still running, and mark
one that is past its log rewrite and scanning as failed. A claim is an exclusive
`flock` on `<home>/run/erasure/<job_id>.lock`, held for the hand-over's life; the
kernel drops it when its process dies, which is exactly when the job needs resuming.
"""

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


class JobClaim:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


def claim(run_dir: Path, job_id: str) -> JobClaim | None:
    """The job's claim, or None while another process (or thread) holds it."""
    folder = run_dir / "erasure"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{job_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return JobClaim(fd)


def released(owner: JobClaim | None, fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, then release the job's claim."""

    def run() -> None:
        try:
            fn()
        finally:
            if owner is not None:
                owner.release()

    return run


def claimed(run_dir: Path, job_id: str, fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` under the job's claim, unless another process's resume took the job first
    (then that process runs it)."""

    def run() -> None:
        owner = claim(run_dir, job_id)
        if owner is not None:
            released(owner, fn)()

    return run
