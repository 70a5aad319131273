"""The erasure tests' live stack (tests/e2e/test_erasure*.py): the API in process and the
stream as `python -m pipelines` on one data home, and the scan that proves an erasure.

The scan runs in a child process (`storage.erasure_scan.scan_tree_apart`): this test
process has the API's SQLite files open, and reading them here would drop its POSIX
locks on close (sqlite.org/howtocorrupt.html 2.2.1), after which the stream may delete
the WAL under the API and the two see different databases.
"""

import contextlib
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from nextbest.settings import Settings
from serving.app import create_app
from storage.erasure_scan import Needles, scan_tree_apart
from tests.support.stream_helpers import start_stream

Stack = tuple[TestClient[Any], subprocess.Popen[bytes]]


@contextlib.contextmanager
def api_and_stream(settings: Settings) -> Iterator[Stack]:
    """The API (no keys, no rate limit) and a stream process; the stream is killed after."""
    app = create_app(settings, require_keys=False, rate_limit_per_s=None, refresh_interval_s=0.2)
    with TestClient(app) as client:
        proc = start_stream(settings)
        try:
            yield client, proc
        finally:
            proc.kill()
            proc.wait(timeout=20)


def scan_apart(home: Path, ids: Iterable[str | bytes]) -> list[str]:
    """`<file>: <id>` for every file under `home` holding one of `ids`."""
    hits = []
    for raw in ids:
        needle = raw.decode() if isinstance(raw, bytes) else raw
        hits += [f"{path}: {needle}" for path in scan_tree_apart(home, Needles([needle]))]
    return sorted(hits)
