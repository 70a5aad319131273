"""The per-user state the stream writes and the decide path reads, typed and versioned.

`SessionState` is the `session` column of the online store's `nb_user_state` row: the
contract between the stream (`pipelines.profile.UserProfile.user_state` writes it) and
decide (`nextbest.decide.candidates.user_view` reads it; `GET /v1/users/{id}/features`
shows its `session_id`). Changing a field is a change here: add it with a default, or
bump `VERSION` and teach `decode` the old layout.

It lives in `nextbest.features` rather than `nextbest.decide` because it is what the
feature pipeline produces (the stream today, a batch backfill could write it too) and
the writers must not depend on the decision logic; decide is one of its readers.

Encoding: JSON (msgspec), with the layout version in `"v"`. A row without `"v"` was
written before the versioning (version 0, the same fields) and reads as such; a row of
another version is refused with `StateVersionError`, never guessed at. Decoding is one
msgspec call into typed fields, cheaper than `json.loads` of the same text, so the
decide path pays nothing for the validation.
"""

from collections.abc import Mapping
from typing import Any

import msgspec

VERSION = 1
"""Layout version of `SessionState`, stored in its `"v"` field."""


class StateVersionError(ValueError):
    """A stored state this code cannot read (another version, or malformed)."""


class OnlineEvidence(msgspec.Struct, kw_only=True, frozen=True):
    """The user's online model as the stream stores it (`nextbest.learn.online_model`):
    decayed [taken, dismissed, ignored] sums per half-life (ms) and target, anchored at
    `anchor_ms`, and undecayed exposure counts per target (for explanations)."""

    anchor_ms: int = 0
    half_lives: dict[int, dict[str, tuple[float, float, float]]] = {}
    counts: dict[str, tuple[int, int, int]] = {}


class SessionState(msgspec.Struct, kw_only=True, frozen=True, tag_field="v", tag=VERSION):
    """What the stream knows about a user's recent behaviour, as decide reads it."""

    session_id: str | None = None
    """The session of the user's newest event."""
    last_ts_ms: int = -1
    """Event time of the user's newest event (-1: none yet)."""
    history: list[tuple[str, str, int]] = []
    """(item_id, event_type, ts_ms) of the newest interactions, newest first."""
    seen: dict[str, list[str]] = {}
    """event type -> distinct item ids, newest first."""
    online_model: OnlineEvidence | None = None
    """Learned from the user's feedback; None until there is some."""

    def encode(self) -> bytes:
        """The versioned JSON the online store keeps (`"v"` first)."""
        return _ENCODER.encode(self)

    def to_builtins(self) -> dict[str, Any]:
        """The same as `encode`, as a dict (for SQLAlchemy's JSON column type)."""
        return msgspec.to_builtins(self, str_keys=True)

    @classmethod
    def decode(cls, data: bytes | str) -> "SessionState":
        """From `encode`'s output (or a version-0 row); StateVersionError otherwise."""
        try:
            return _DECODER.decode(data)
        except msgspec.ValidationError as exc:  # valid JSON, not this layout
            raw = msgspec.json.decode(data)
            if isinstance(raw, Mapping) and raw.get("v") is None:
                return _lenient_v0(raw)
            raise _refused(raw, exc) from None
        except msgspec.DecodeError as exc:
            raise StateVersionError(f"user state is not valid JSON: {exc}") from None

    @classmethod
    def load(cls, raw: Any) -> "SessionState":
        """From whatever a driver hands back for the column: JSON text or bytes, an
        already parsed dict (PostgreSQL's JSON type), a SessionState, or None (empty).

        A dict without `"v"` is version 0, also as built by hand: its entries of the
        wrong shape are skipped (as decide always did), the rest is read as is."""
        if raw is None:
            return EMPTY
        if isinstance(raw, SessionState):
            return raw
        if isinstance(raw, bytes | bytearray | memoryview | str):
            return cls.decode(bytes(raw) if not isinstance(raw, str) else raw)
        if not isinstance(raw, Mapping):
            raise StateVersionError(f"user state must be a JSON object, not {type(raw).__name__}")
        try:
            return msgspec.convert(raw, cls, str_keys=True)
        except msgspec.ValidationError as exc:
            if raw.get("v") is None:
                return _lenient_v0(raw)
            raise _refused(raw, exc) from None


EMPTY = SessionState()
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(SessionState)


def _refused(raw: Any, exc: Exception) -> StateVersionError:
    version = raw.get("v") if isinstance(raw, Mapping) else None
    if version is not None and version != VERSION:
        return StateVersionError(
            f"user state has layout version {version!r}; this nextbest reads versions 0 "
            f"and {VERSION} (written by a newer release? upgrade the API as well)"
        )
    return StateVersionError(f"user state (version {version or 0}) is malformed: {exc}")


def _lenient_v0(raw: Mapping[str, Any]) -> SessionState:
    """A version-0 dict with some malformed entries: keep the well-formed ones."""
    history = [
        (e[0], e[1], int(e[2]))
        for e in raw.get("history") or []
        if isinstance(e, list | tuple)
        and len(e) >= 3
        and isinstance(e[0], str)
        and isinstance(e[1], str)
        and isinstance(e[2], int | float)
        and not isinstance(e[2], bool)
    ]
    seen_raw = raw.get("seen")
    seen = {
        str(k): [i for i in v if isinstance(i, str)]
        for k, v in (seen_raw.items() if isinstance(seen_raw, Mapping) else ())
        if isinstance(v, list)
    }
    try:
        online = msgspec.convert(raw.get("online_model"), OnlineEvidence | None, str_keys=True)
    except msgspec.ValidationError:
        online = None
    session_id = raw.get("session_id")
    last = raw.get("last_ts_ms")
    return SessionState(
        session_id=session_id if isinstance(session_id, str) else None,
        last_ts_ms=int(last) if isinstance(last, int) and not isinstance(last, bool) else -1,
        history=history,
        seen=seen,
        online_model=online,
    )


# --- recovery snapshots of the stream's per-key state -------------------------------
#
# Bytewax keeps what a stateful step's `snapshot` returns. These layouts make that
# plain msgpack, never a pickled class: a module rename (there was one) cannot break a
# resume, and a snapshot of another layout is refused with a message, never misread.
# The tag (first array element) is the kind and layout version; change a layout here
# by adding a new tagged Struct and reading the old one into it.

Entry = tuple[int, int, str, Any]
"""A window entry: (ts_ms, event_key, group, value)."""
Recent = tuple[int, list[tuple[int, str]]]
"""A `RecentItems`: (n, [(ts_ms, item_id), ...] newest first)."""


class WindowSnapshot(msgspec.Struct, array_like=True):
    window_ms: int
    agg: str
    entries: list[Entry]


class OnlineSnapshot(msgspec.Struct, array_like=True):
    """`nextbest.learn.online_model.OnlineState`, field for field."""

    anchor_ms: int
    sums: dict[int, dict[str, list[float]]]
    counts: dict[str, list[int]]
    exposures: list[tuple[str, str, int, int]]  # (decision_id, target, ts_ms, signal)
    floor: tuple[int, str, str] | None
    forgotten: list[int]


class UserSnapshot(msgspec.Struct, array_like=True, tag="user.1"):
    """`pipelines.profile.UserProfile` (what it derives on restore left out)."""

    windows: dict[str, WindowSnapshot]
    rewrite: list[str]
    recent: dict[str, Recent]
    seen: dict[str, Recent]
    interactions: list[tuple[int, str, str, str]]  # (ts_ms, event_id, item_id, type)
    latest: tuple[int, str]
    session_id: str | None
    online: OnlineSnapshot | None


class ItemSnapshot(msgspec.Struct, array_like=True, tag="item.1"):
    """`pipelines.profile.ItemProfile`."""

    windows: dict[str, WindowSnapshot]
    rewrite: list[str]


_BIGINT = 1  # msgpack ext code: an int beyond 64 bits (a client's JSON may hold one)


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == _BIGINT:
        return int(bytes(data).decode())
    raise StateVersionError(f"unknown msgpack extension {code} in a recovery snapshot")


def _big(value: Any) -> Any:
    """`value` with every int msgpack cannot hold as an extension (the slow path)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if -(1 << 63) <= value < (1 << 64):
            return value
        return msgspec.msgpack.Ext(_BIGINT, str(value).encode())
    if isinstance(value, list | tuple):
        return [_big(v) for v in value]
    if isinstance(value, dict):
        return {k: _big(v) for k, v in value.items()}
    return value


_PACK = msgspec.msgpack.Encoder()


def encode_snapshot(layout: tuple[Any, ...]) -> bytes:
    """A snapshot from its layout as a plain tuple, tag first (see `UserSnapshot`):
    encoding the tuple directly skips building the Structs on the hot path."""
    try:
        return _PACK.encode(layout)
    except OverflowError:
        return _PACK.encode(_big(layout))


class SnapshotCodec:
    """Decodes one kind of snapshot, refusing any other kind or version clearly."""

    def __init__(self, kind: type[msgspec.Struct]) -> None:
        self.kind = kind
        self.tag = kind.__struct_config__.tag
        self._decoder = msgspec.msgpack.Decoder(kind, ext_hook=_ext_hook)

    def decode(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            try:
                raw = msgspec.msgpack.decode(data, ext_hook=_ext_hook)
            except msgspec.DecodeError:
                raw = None
            tag = raw[0] if isinstance(raw, list) and raw else None
            if tag != self.tag:
                raise StateVersionError(
                    f"recovery snapshot of layout {tag!r}, this nextbest reads {self.tag!r} "
                    "here (written by another release? resume with that release, or start "
                    "the stream without its recovery directory to rebuild from the log)"
                ) from None
            raise StateVersionError(f"recovery snapshot {tag!r} is malformed: {exc}") from None
        except msgspec.DecodeError as exc:
            raise StateVersionError(f"recovery snapshot is not msgpack: {exc}") from None


USER_SNAPSHOT = SnapshotCodec(UserSnapshot)
ITEM_SNAPSHOT = SnapshotCodec(ItemSnapshot)
