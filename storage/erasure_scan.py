"""The proof an erasure job needs before it says `done`: no file under the data home
holds an erased id.

An id "appears" where its bytes occur with no letter or digit directly before or after
them: `vis1` is found in `"vis1"`, `anon:vis1` and `web-vis1-3` (a client-chosen event id
that embeds it), not in `vis10`, so erasing `u1` does not report every `u10`. The same
test decides which records and rows an erasure removes (`mentions`), so what is erased
and what is checked agree.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from nextbest.ingest.events import anon_actor, anonymous_of

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


def scan_tree_apart(root: Path, needles: Needles, *, timeout_s: float = 120.0) -> list[str]:
    """`scan_tree` in a child process. A process that has SQLite files of the tree open
    (the API's or the stream's online store, Bytewax's recovery) must not read them
    itself: closing any descriptor of a file drops every POSIX lock the process holds on
    it, its SQLite connections' included, and another process may then checkpoint or
    truncate the WAL/-shm under them (sqlite.org/howtocorrupt.html 2.2.1)."""
    if not needles:
        return []
    out = subprocess.run(
        [sys.executable, "-m", "storage.erasure_scan"],
        input=json.dumps({"root": str(root), "ids": needles.ids}).encode(),
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"erasure scan: {out.stderr.decode(errors='replace')[-400:]}")
    return list(json.loads(out.stdout))


IDENTITY_FIELDS = ("user_id", "anonymous_id")
"""Top-level fields of a log record (event, decision, feedback, erase request) that hold
an actor; `features.requested_user_id` of a decision is one too."""
TOKEN_FIELDS = ("event_id", "decision_id")
"""Client- or server-chosen ids that name a person when they embed an id as a token."""
_FIELD_PAIR = re.compile(
    rb'"(user_id|anonymous_id|requested_user_id|event_id|decision_id)"\s*:\s*"((?:[^"\\]|\\.)*)"'
)


class Person:
    """Which records belong to a person: those naming them in an identity field (the
    user id, an anonymous id, a decision's requested user, or an `event_id` /
    `decision_id` that embeds an id as a token), never a record that merely spells an id
    elsewhere (`"type": "view"` is not user `view`, an item id is not a user id)."""

    def __init__(self, user_id: str, anonymous: Iterable[str] = ()) -> None:
        self.anonymous = {a for a in anonymous if a}
        visitor = anonymous_of(user_id)
        if visitor is not None:
            self.anonymous.add(visitor)
        self.actors = {user_id, *(anon_actor(a) for a in self.anonymous)}
        self.tokens = Needles([user_id, *self.anonymous])

    def names(self, raw: object) -> bool:
        """Does a decoded record name the person in one of its identity fields?"""
        if not isinstance(raw, dict):
            return False
        user, anon = raw.get("user_id"), raw.get("anonymous_id")
        if isinstance(user, str) and user in self.actors:
            return True
        if isinstance(anon, str) and anon in self.anonymous:
            return True
        features = raw.get("features")
        if isinstance(features, dict) and features.get("requested_user_id") in self.actors:
            return True
        for name in TOKEN_FIELDS:
            value = raw.get(name)
            if isinstance(value, str) and self.tokens.found_in(value.encode()):
                return True
        return False

    def in_payload(self, payload: bytes) -> bool:
        """A raw log record or dead letter. The byte scan is only a cheap prefilter (most
        records name none of the ids at all); the decoded fields decide. A payload that
        does not decode (bad UTF-8, truncated, nested too deep) is judged by the
        `"field": "value"` pairs of the identity fields found in its bytes, wherever they
        are nested, and nothing else."""
        if not self.tokens.found_in(payload):
            return False
        try:
            raw = json.loads(payload)
        except (ValueError, RecursionError):
            return self._recovered(payload)
        return self.names(raw)

    def _recovered(self, payload: bytes) -> bool:
        for m in _FIELD_PAIR.finditer(payload):
            field, value = m.group(1).decode(), _json_string(m.group(2))
            if field in TOKEN_FIELDS:
                if self.tokens.found_in(value.encode()):
                    return True
            elif value in self.actors or (field == "anonymous_id" and value in self.anonymous):
                return True
        return False


def _json_string(body: bytes) -> str:
    try:
        value = json.loads(b'"' + body + b'"')
    except (ValueError, RecursionError):
        return body.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""


RECORD_WORDS = frozenset(
    {"record", "event", "decision", "feedback", "erase", "dead", "type", "ts", "value"}
    | {"properties", "context", "features", "actions", "candidates", *IDENTITY_FIELDS}
    | {*TOKEN_FIELDS, "item_id", "job_id", "anonymous_ids", "anon", "item", "user", "users"}
)
"""Words every store spells as structure (field names, record kinds, key prefixes)."""


def vocabulary(spec_path: Path | None) -> frozenset[str]:
    """Words the stores spell for everyone: `RECORD_WORDS` and every word of the spec
    (event types, features, properties...). An id equal to one (user `view`) cannot be
    proven absent by bytes, as every view record spells it: the proof skips its bytes
    and relies on the rest (other ids, the keyed hash of its state key)."""
    words = set(RECORD_WORDS)
    if spec_path is not None:
        try:
            text = spec_path.read_text(errors="replace")
        except OSError:
            text = ""
        words.update(re.findall(r"[A-Za-z0-9_]+", text))
    return frozenset(words)


def provable(ids: Iterable[str], words: frozenset[str]) -> tuple[list[str], list[str]]:
    """(ids a byte scan can prove absent, ids it cannot: words of `vocabulary`)."""
    ids = sorted({i for i in ids if i})
    return [i for i in ids if i not in words], [i for i in ids if i in words]


if __name__ == "__main__":
    _req = json.load(sys.stdin)
    json.dump(scan_tree(Path(_req["root"]), Needles(_req["ids"])), sys.stdout)
