"""Bounds on what the door accepts: timestamps, ids, numbers, nesting, array sizes.

Everything here is pure and cheap. `Limits` is built from `Settings` by the API and the
importer; `scan_json` checks a raw request body's nesting and array sizes before any
JSON decoder sees it (a decoder recursing 3,000 levels deep is the failure it prevents).
Each check raises `LimitExceeded` with a message that starts with the field it names.
"""

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np

from nextbest.ingest.events import ACTOR_PREFIXES, NO_CONSENT_PREFIX, anonymous_of

RESERVED_ID_PREFIX = NO_CONSENT_PREFIX
"""Ids the system makes for events stored without their person (`nextbest.ingest.consent`)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class LimitExceeded(ValueError):
    """A value outside the configured bounds; the message names the field."""


class _LimitSettings(Protocol):
    max_future_s: float
    min_event_ts: datetime
    max_id_length: int
    max_abs_number: float
    max_nesting: int
    max_array_length: int
    max_body_depth: int
    max_body_array: int


@dataclass(frozen=True)
class Limits:
    """Defaults match `Settings`; `from_settings` takes the configured ones."""

    max_future_s: float = 300.0
    min_ts: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    max_id_length: int = 200
    max_abs_number: float = 1e12
    max_nesting: int = 8
    max_array_length: int = 1000
    max_body_depth: int = 32
    max_body_array: int = 10_000

    @classmethod
    def from_settings(cls, settings: _LimitSettings) -> "Limits":
        min_ts = settings.min_event_ts
        return cls(
            max_future_s=settings.max_future_s,
            min_ts=min_ts if min_ts.tzinfo else min_ts.replace(tzinfo=UTC),
            max_id_length=settings.max_id_length,
            max_abs_number=settings.max_abs_number,
            max_nesting=settings.max_nesting,
            max_array_length=settings.max_array_length,
            max_body_depth=settings.max_body_depth,
            max_body_array=settings.max_body_array,
        )

    def check_ts(self, field: str, ts: datetime, now: datetime | None = None) -> datetime:
        """An aware UTC `ts` inside [min_ts, now + max_future_s]; old history is fine."""
        try:
            ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
        except (OverflowError, ValueError):
            raise LimitExceeded(f"{field}: out of the representable range") from None
        now = now or datetime.now(UTC)
        if ts < self.min_ts:
            raise LimitExceeded(f"{field}: before {self.min_ts.isoformat()}")
        if ts - now > timedelta(seconds=self.max_future_s):
            raise LimitExceeded(
                f"{field}: more than {self.max_future_s:g} s ahead of the server clock"
            )
        return ts

    def check_id(self, field: str, value: str | None, *, actor: bool = False) -> None:
        """Bounded length, no control characters; `actor` ids (user/anonymous) must not
        start with a prefix the system uses."""
        if value is None:
            return
        if len(value) > self.max_id_length:
            raise LimitExceeded(f"{field}: longer than {self.max_id_length} characters")
        if _CONTROL.search(value):
            raise LimitExceeded(f"{field}: control characters (e.g. NUL) are not allowed")
        if actor and value.startswith(ACTOR_PREFIXES):
            raise LimitExceeded(f"{field}: ids starting with {list(ACTOR_PREFIXES)} are reserved")

    def check_actor_ref(self, field: str, value: str) -> None:
        """A user id as decide/feedback take it: a user id or `anon:<anonymous id>`."""
        anonymous = anonymous_of(value)
        self.check_id(field, value if anonymous is None else anonymous, actor=True)

    def check_number(self, field: str, value: float | None) -> None:
        if value is None:
            return
        if not math.isfinite(value) or abs(value) > self.max_abs_number:
            raise LimitExceeded(f"{field}: must be finite with |value| <= {self.max_abs_number:g}")

    def check_json(self, field: str, value: Any, depth: int = 0) -> None:
        """Nesting, array/object sizes and numbers of a decoded JSON value."""
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int | float):
            try:
                self.check_number(field, float(value))
            except OverflowError:
                raise LimitExceeded(f"{field}: number out of range") from None
            return
        if depth >= self.max_nesting:
            raise LimitExceeded(f"{field}: nested deeper than {self.max_nesting} levels")
        if isinstance(value, dict | list) and len(value) > self.max_array_length:
            raise LimitExceeded(f"{field}: more than {self.max_array_length} entries")
        if isinstance(value, dict):
            for k, v in value.items():
                self.check_json(f"{field}.{k}", v, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.check_json(f"{field}[{i}]", v, depth + 1)


_STRUCTURE = bytes(range(256)).translate(None, b"[]{},")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def skeleton(body: bytes) -> bytes:
    """`body` without its strings, reduced to brackets and commas. Escaped backslashes,
    then escaped quotes, are dropped first, so every quote left delimits a string and
    splitting on quotes leaves the outside at even positions (all in C)."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"")
    body = body.replace(b'\\"', b"")
    return b"".join(body.split(b'"')[::2]).translate(None, _STRUCTURE)


def scan_json(body: bytes, *, max_depth: int, max_array: int) -> str | None:
    """Why `body` nests too deep or holds too long an array, else None, without
    decoding. Exact for valid JSON (invalid JSON is the decoder's to refuse)."""
    if b"[" not in body and b"{" not in body:
        return None
    sk = skeleton(body)
    if len(sk) <= _SMALL:
        return _walk(sk, max_depth, max_array)
    return _vectorized(np.frombuffer(sk, dtype=np.uint8), max_depth, max_array)


_SMALL = 512
_DEEP = "request body: nested deeper than {} levels"
_LONG = "request body: an array holds more than {} items"


def _walk(sk: bytes, max_depth: int, max_array: int) -> str | None:
    """The plain walk, for the small bodies of the hot path (numpy costs more there)."""
    stack: list[list[int]] = []  # [is_array, commas]
    for c in sk:
        if c == 0x2C:
            if stack:
                stack[-1][1] += 1
                if stack[-1][0] and stack[-1][1] >= max_array:
                    return _LONG.format(max_array)
        elif c in (0x5B, 0x7B):
            if len(stack) >= max_depth:
                return _DEEP.format(max_depth)
            stack.append([c == 0x5B, 0])
        elif stack:
            stack.pop()
    return None


def _vectorized(sk: np.ndarray, max_depth: int, max_array: int) -> str | None:
    """Depth is the running sum of +1 per opening and -1 per closing bracket; a comma
    belongs to the latest container opened at its depth, looked up only at the depths
    that hold enough commas to matter."""
    step = _STEP[sk]
    depth = np.cumsum(step, dtype=np.int32)
    if int(depth.max(initial=0)) > max_depth:
        return _DEEP.format(max_depth)
    commas = np.flatnonzero(sk == ord(","))
    if commas.size < max_array:
        return None
    comma_depth = depth[commas]
    per_depth = np.bincount(comma_depth, minlength=max_depth + 1)
    opens = np.flatnonzero(step > 0)
    open_depth = depth[opens]
    for d in np.flatnonzero(per_depth >= max_array):
        starts = opens[open_depth == d]
        if starts.size == 0:
            continue
        if starts.size == 1:  # one container at this depth holds all its commas
            if sk[starts[0]] == ord("["):
                return _LONG.format(max_array)
            continue
        owner = np.searchsorted(starts, commas[comma_depth == d], side="right") - 1
        counts = np.bincount(owner[owner >= 0], minlength=starts.size)
        if int(counts[sk[starts] == ord("[")].max(initial=0)) >= max_array:
            return _LONG.format(max_array)
    return None
