"""The proof an erasure job needs before it says `done`: no file under the data home
holds an erased id.

An id "appears" where its bytes occur with no letter or digit directly before or after
them: `vis1` is found in `"vis1"`, `anon:vis1` and `web-vis1-3` (a client-chosen event id
that embeds it), not in `vis10`, so erasing `u1` does not report every `u10`. The same
test decides which records and rows an erasure removes (`mentions`), so what is erased
and what is checked agree.
"""

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

_CHUNK = 1 << 20  # small reads: the GIL is released between them (the API serves meanwhile)


def _pattern(needles: Iterable[bytes]) -> re.Pattern[bytes] | None:
    alts = sorted({re.escape(n) for n in needles if n}, key=len, reverse=True)
    if not alts:
        return None
    return re.compile(rb"(?<![A-Za-z0-9])(?:" + b"|".join(alts) + rb")(?![A-Za-z0-9])")


class Needles:
    """A compiled set of ids (as bytes) to look for."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = sorted({i for i in ids if i})
        self._re = _pattern(i.encode() for i in self.ids)
        self.longest = max((len(i.encode()) for i in self.ids), default=0)

    def __bool__(self) -> bool:
        return self._re is not None

    def found_in(self, data: bytes | bytearray | memoryview) -> bool:
        return self._re is not None and self._re.search(data) is not None

    def in_file(self, path: Path) -> bool:
        """Chunked, with an overlap so an id across a chunk boundary is still seen."""
        if self._re is None:
            return False
        overlap = self.longest + 1
        with open(path, "rb") as f:
            tail = b""
            while chunk := f.read(_CHUNK):
                if self._re.search(tail + chunk):
                    return True
                tail = chunk[-overlap:]
        return False


def mentions(data: bytes, ids: Sequence[str]) -> bool:
    """Does `data` name one of `ids` (see the module docstring)?"""
    return Needles(ids).found_in(data)


def scan_tree(root: Path, needles: Needles, *, skip: Iterable[Path] = ()) -> list[str]:
    """Files under `root` (relative paths) that hold one of the ids. Files that vanish
    while scanning (compaction, a rewrite) are skipped: their replacement is scanned."""
    skipped = {p.resolve() for p in skip}
    found: list[str] = []
    if not needles or not root.is_dir():
        return found
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.resolve() in skipped:
                continue
            try:
                if needles.in_file(path):
                    found.append(str(path.relative_to(root)))
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
    return sorted(found)
