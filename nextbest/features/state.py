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
