"""The keyed state steps' machinery, split from `pipelines.flow`: `FoldLogic` (a state
folded one batch at a time, with the spec's `state.ttl`), identity stitching, and the
dead letters of records that raise inside a step.
"""

import io
import json
import logging
import pickle
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

from bytewax.operators import StatefulBatchLogic

from nextbest.ingest.events import Event
from nextbest.learn.online_model import Feedback
from pipelines.metrics import STREAM_METRICS
from pipelines.profile import FeaturePlan, ItemProfile, UserProfile
from pipelines.records import Erase, Record, Routed, dead_record
from storage.online.models import now_ms

S = TypeVar("S")
V = TypeVar("V")
W = TypeVar("W")
Incoming = tuple[int, int, Event | Feedback]  # what the stitch step routes

log = logging.getLogger(__name__)

STITCH_BUFFER = 1000
"""Anonymous events remembered per visitor until an identify event links them."""
FEEDBACK_BUFFER = 256
"""Anonymous feedback records remembered per visitor, apart from its events: feedback
(impressions above all) must not push behaviour out of the event buffer, or the stitched
profile would no longer equal a batch recomputation."""


class FoldLogic(StatefulBatchLogic[Any, W, bytes], Generic[S, V, W]):
    """A keyed state folded one batch at a time; snapshots are bytes (`Codec`).

    Folding a whole batch per key (instead of per item) computes aggregates once per
    batch, and encoding once is far cheaper than the deepcopy `stateful_map` does on
    every snapshot, while being just as immutable. An `Erase` in the batch forgets
    everything before it; if nothing follows, the key is discarded.

    With a `retention` (spec `state.ttl`), the key asks Bytewax to wake it `ttl` after
    its newest event time and is discarded then if nothing newer came (its recovery
    state goes with it): the hot path pays one `notify_at` per touched key, no more.
    With an `owner` too, the logic remembers whose state it is (Bytewax keys it by a
    hash) and emits `owner.expired(actor)` then, so the sinks forget the actor's online
    rows and vector as well (`Expired`).
    """

    def __init__(
        self,
        state: S,
        fold: Callable[[S, list[V]], list[W]],
        new: Callable[[], S],
        retention: "Retention | None" = None,
        encode: Callable[[S], bytes] | None = None,
        owner: "Owner | None" = None,
        actor: str | None = None,
    ) -> None:
        self.state = state
        STREAM_METRICS.track_state(self, state)  # state size (pipelines.metrics)
        self._fold = fold
        self._new = new
        self._retention = retention
        self._encode = encode
        self._owner = owner if retention is not None else None
        self.actor = actor

    def on_batch(self, values: list[Any]) -> tuple[Iterable[W], bool]:
        cut = max((i for i, v in enumerate(values) if isinstance(v, Erase)), default=-1)
        if cut >= 0:
            self.state = self._new()
            values = values[cut + 1 :]
            if not values:
                return [], StatefulBatchLogic.DISCARD
        if self._owner is not None and self.actor is None:
            self.actor = self._owner.of(values[0])
        return self._fold(self.state, values), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        retention = self._retention
        if retention is None:
            return None
        return datetime.fromtimestamp(retention.expires_ms(self.state) / 1000, tz=UTC)

    def on_notify(self) -> tuple[Iterable[W], bool]:
        retention = self._retention
        if retention is not None and retention.expires_ms(self.state) <= now_ms():
            owner, actor = self._owner, self.actor
            forget = owner.expired(actor) if owner is not None and actor is not None else []
            return forget, StatefulBatchLogic.DISCARD
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        if self._encode is not None:
            data = self._encode(self.state)
        else:
            data = pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
        return data if self._owner is None or self.actor is None else owned(self.actor, data)


class Expired(NamedTuple):
    """An actor whose stream state expired (spec `state.ttl`): the online sink deletes
    its features and state, the vector sink its LanceDB row. "Forgotten after ttl"
    means online too, not only in the stream's memory."""

    actor: str


class Owner(NamedTuple):
    """Whose state a keyed logic holds (`of` its first value) and what its expiry emits."""

    of: Callable[[Any], str | None]
    expired: Callable[[str], list[Any]]


OWNED = b"\xc1own"
"""Prefix of a snapshot that names its actor. 0xC1 is never used by msgpack and is no
pickle opcode a snapshot starts with, so a snapshot without it decodes as before."""


def owned(actor: str, data: bytes) -> bytes:
    name = actor.encode()
    return OWNED + len(name).to_bytes(2, "big") + name + data


def unowned(data: bytes) -> tuple[str | None, bytes]:
    """(actor, the state's own snapshot) of a snapshot `owned` wrote, else (None, data)."""
    if not data.startswith(OWNED):
        return None, data
    size = int.from_bytes(data[len(OWNED) : len(OWNED) + 2], "big")
    start = len(OWNED) + 2
    return data[start : start + size].decode(), data[start + size :]


class Codec(NamedTuple, Generic[S]):
    """How a state becomes a recovery snapshot and back (the profiles' versioned msgpack,
    `nextbest.features.state`); states without one are pickled."""

    encode: Callable[[S], bytes]
    decode: Callable[[bytes], S]


RENAMED = {
    "nextbest.windows": "nextbest.features.windows",
    "nextbest.features": "nextbest.features.semantics",  # a module before the package
    "nextbest.online_model": "nextbest.learn.online_model",
    "nextbest.events": "nextbest.ingest.events",
}
"""Modules that moved, for pickled snapshots written before they did."""


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(RENAMED.get(module, module), name)


def unpickle(data: bytes) -> Any:
    """A pickled snapshot (a legacy one, or a state without a `Codec`)."""
    return _LegacyUnpickler(io.BytesIO(data)).load()


def is_pickle(data: bytes) -> bool:
    """Pickles of protocol 2+ start with PROTO (0x80); the codecs' msgpack never does."""
    return data[:1] == b"\x80"


class Retention(NamedTuple):
    """When an idle key's state expires: its newest event time (`newest`) plus `ttl_ms`."""

    ttl_ms: int
    newest: Callable[[Any], int]

    def expires_ms(self, state: Any) -> int:
        try:
            return self.newest(state) + self.ttl_ms
        except Exception:  # the bookkeeping must never stop the stream: keep the state
            return now_ms() + self.ttl_ms


def state_builder(
    new: Callable[[], S],
    fold: Callable[[S, list[V]], list[W]],
    retention: Retention | None = None,
    codec: Codec[S] | None = None,
    owner: Owner | None = None,
) -> Callable[[bytes | None], FoldLogic[S, V, W]]:
    encode = codec.encode if codec is not None else None

    def build(resume: bytes | None) -> FoldLogic[S, V, W]:
        if resume is None:
            return FoldLogic(new(), fold, new, retention, encode, owner)
        actor, resume = unowned(resume)
        # A pickle: a state without a codec, or a snapshot written before it had one.
        legacy = codec is None or is_pickle(resume)
        state = unpickle(resume) if legacy or codec is None else codec.decode(resume)
        restored = getattr(state, "restored", None)
        if restored is not None:
            restored()  # rows written after this snapshot are unknown: rewrite them
        return FoldLogic(state, fold, new, retention, encode, owner, actor)

    return build


class StitchState:
    """Per anonymous visitor: the user it was linked to, or its buffered history."""

    def __init__(self) -> None:
        self.user: str | None = None
        self.buffer: list[Incoming] = []
        self.feedback: list[Incoming] = []
        self.newest_ms = -1  # newest event or feedback time seen (for `state.ttl`)


def stitch(
    state: StitchState, batch: list[Incoming], identify: frozenset[str]
) -> list[Routed | Record]:
    """Route an anonymous visitor's events; on identify, re-send its history to the user.

    The user's feature states are idempotent by event_id and order-independent, so
    re-sending the buffered events merges the anonymous profile into the user's exactly
    as a batch recomputation with `identity_links` would. The first link wins. A record
    that raises becomes a dead letter (a `Record`) and the others go on.
    """
    out: list[Routed | Record] = []
    for partition, offset, event in batch:
        try:
            _stitch_one(state, partition, offset, event, identify, out)
        except Exception as exc:  # one bad record never stops the stream
            out.append(failed(partition, offset, event, exc, "stitch_identity"))
    return out


def _stitch_one(
    state: StitchState,
    partition: int,
    offset: int,
    event: Event | Feedback,
    identify: frozenset[str],
    out: list[Any],
) -> None:
    """One record of `stitch` (appends what it routes to `out`)."""
    state.newest_ms = max(getattr(state, "newest_ms", -1), event.ts_ms)
    if isinstance(event, Feedback):
        if state.user is not None:
            out.append(Routed(state.user, partition, offset, event))
        else:
            # Snapshots from before the separate buffer have no `feedback` attribute.
            if not hasattr(state, "feedback"):
                state.feedback = []
            state.feedback.append((partition, offset, event))
            del state.feedback[:-FEEDBACK_BUFFER]
            out.append(Routed(event.user_id, partition, offset, event))
    elif event.type in identify and event.user_id is not None:
        if state.user is None:
            state.user = event.user_id
            out.append(Routed(event.user_id, partition, offset, event, link=True))
            held = [*state.buffer, *getattr(state, "feedback", [])]
            out.extend(Routed(event.user_id, p, o, e) for p, o, e in held)
            state.buffer, state.feedback = [], []
        else:
            out.append(Routed(event.user_id, partition, offset, event))
    elif state.user is not None:
        out.append(Routed(state.user, partition, offset, event))
    else:
        state.buffer.append((partition, offset, event))
        del state.buffer[:-STITCH_BUFFER]
        out.append(Routed(event.actor, partition, offset, event))


def failed(partition: int, offset: int, item: Any, exc: BaseException, step: str) -> Record:
    """The dead letter of a record that raised in a step (logged once, then kept going)."""
    log.warning("stream step %s: record p%d@%d failed: %r", step, partition, offset, exc)
    error = f"{step}: {type(exc).__name__}: {exc}"
    return dead_record(partition, offset, _raw(item), error, source=f"stream:{step}")


def _raw(item: Any) -> str:
    """A failed record as JSON text, for inspection and replay."""
    try:
        if isinstance(item, Event):
            return item.model_dump_json()
        if isinstance(item, Feedback):
            return json.dumps(item._asdict(), default=str)
        if isinstance(item, Erase):
            return json.dumps({"record": "erase", **item._asdict()}, default=str)
        return json.dumps(item, default=str)
    except Exception:
        return repr(item)[:10_000]


def retention_of(plan: FeaturePlan, state: type) -> Retention | None:
    """The spec's `state.ttl` for a state type, never shorter than the longest window
    (see `nextbest.spec.models.StateRetention`); None keeps every key."""
    ttl = plan.spec.state.ttl
    if ttl is None:
        return None
    longest = max(plan.window_ms.values(), default=0)
    newest = {UserProfile: _user_ms, ItemProfile: _item_ms, StitchState: _stitch_ms}[state]
    return Retention(max(int(ttl.seconds * 1000), longest), newest)


def _user_ms(profile: UserProfile) -> int:
    online = profile.online
    return max(profile.latest[0], online.anchor_ms if online is not None else -1)


def _item_ms(profile: ItemProfile) -> int:
    return max((w.anchor_ms or -1 for w in profile.windows.values()), default=-1)


def _stitch_ms(state: StitchState) -> int:
    newest = getattr(state, "newest_ms", None)
    if newest is None:  # a snapshot from before `state.ttl`: its clock starts now
        newest = state.newest_ms = now_ms()
    return newest
