"""`build_flow(settings, spec)`: the Bytewax dataflow of the streaming path.

Shape (item types between steps)::

    input_events          (partition, offset, key, payload bytes)
    parse_records         Record(kind, partition, offset, body)
    consent_records       with privacy.consent: drops/anonymizes what the API did not judge
      key_lake            (str(partition), Record)            -> sink_lake (Delta)
    select_events         (partition, offset, Event)
    select_feedback       (partition, offset, Feedback)         with a user and a target
      route_feedback      from "anon:<id>" users | known users
        key_anonymous_feedback  ("anon:<id>", (partition, offset, Feedback)) -> stitch
        key_user_feedback       (user_id, Routed)                          -> merge_actors
      key_item            (item_id, (partition, offset, Event))
      state_item          (item_id, Update)                     -> online
      route_identity      anonymous (and identify) events | known users
        key_anonymous     ("anon:<id>", (partition, offset, Event))
        stitch_identity   ("anon:<id>", Routed)  link + buffered anonymous history
                          (events and feedback: an anonymous visitor's online model
                          follows them to the user they identify as)
        rekey_stitched    (actor, Routed)
        key_user          (user_id, Routed)
      merge_actors        (actor, Routed)
      state_user          (actor, Update)                       -> online, vectors
                          folds events into features and feedback into the online
                          model (`UserState.session["online_model"]`, same write)
    sink_online           Update                                 (OnlineStore upserts)
    sink_user_vectors     ("lance_users", users row)             (LanceDB, one writer)

Step ids come from `Spec.step_id(kind, name)` and never from code positions: they key
the recovery state, so renaming one would orphan its snapshots.

Per-actor state is keyed by `state_key(actor)`, a keyed hash, never the user id: Bytewax
keeps a tombstone row (step, key) in its recovery SQLite for every discarded key
forever, so a plain id there would survive erasure. An `Erase` request (`record:
erase`) reaches the user step under the user's key and the stitch step under each
linked anonymous id's key; both drop their state (`FoldLogic`), so the next snapshot
supersedes the old ones and Bytewax's GC deletes them (`pipelines.erasure`).
"""

import functools
import json
import logging
import pickle
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic

from nextbest.events import Event
from nextbest.online_model import Feedback
from nextbest.settings import Settings
from nextbest.spec import Spec
from nextbest.validation import keyed_hash
from pipelines.catalog import ItemCatalog, StoreCatalog
from pipelines.consent import StreamConsent
from pipelines.profile import FeaturePlan, ItemProfile, Touched, UserProfile
from pipelines.records import (
    Erase,
    Record,
    Routed,
    SourceItem,
    Update,
    dead_record,
    parse_record,
)
from pipelines.sinks import VECTORS_PART, StreamSinks, erase_marker
from pipelines.sources import source_from_settings
from storage.online_models import Alias, now_ms

log = logging.getLogger(__name__)

STITCH_BUFFER = 1000
"""Anonymous events remembered per visitor until an identify event links them."""
FEEDBACK_BUFFER = 256
"""Anonymous feedback records remembered per visitor, apart from its events: feedback
(impressions above all) must not push behaviour out of the event buffer, or the stitched
profile would no longer equal a batch recomputation."""
STATE_KEYS_CACHED = 1 << 16
"""Actors whose state key (a keyed hash) is remembered: the active users, typically."""

S = TypeVar("S")
V = TypeVar("V")
W = TypeVar("W")
Positioned = tuple[int, int, Event]  # (partition, offset, event)
Incoming = tuple[int, int, Event | Feedback]  # what the stitch step routes


def sid(kind: str, name: str) -> str:
    return Spec.step_id(kind, name)


class FoldLogic(StatefulBatchLogic[Any, W, bytes], Generic[S, V, W]):
    """A keyed state folded one batch at a time; snapshots are pickled bytes.

    Folding a whole batch per key (instead of per item) computes aggregates once per
    batch, and pickling once is far cheaper than the deepcopy `stateful_map` does on
    every snapshot, while being just as immutable. An `Erase` in the batch forgets
    everything before it; if nothing follows, the key is discarded.

    With a `retention` (spec `state.ttl`), the key asks Bytewax to wake it `ttl` after
    its newest event time and is discarded then if nothing newer came (its recovery
    state goes with it): the hot path pays one `notify_at` per touched key, no more.
    """

    def __init__(
        self,
        state: S,
        fold: Callable[[S, list[V]], list[W]],
        new: Callable[[], S],
        retention: "Retention | None" = None,
    ) -> None:
        self.state = state
        self._fold = fold
        self._new = new
        self._retention = retention

    def on_batch(self, values: list[Any]) -> tuple[Iterable[W], bool]:
        cut = max((i for i, v in enumerate(values) if isinstance(v, Erase)), default=-1)
        if cut >= 0:
            self.state = self._new()
            values = values[cut + 1 :]
            if not values:
                return [], StatefulBatchLogic.DISCARD
        return self._fold(self.state, values), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        retention = self._retention
        if retention is None:
            return None
        return datetime.fromtimestamp(retention.expires_ms(self.state) / 1000, tz=UTC)

    def on_notify(self) -> tuple[Iterable[W], bool]:
        retention = self._retention
        if retention is not None and retention.expires_ms(self.state) <= now_ms():
            return [], StatefulBatchLogic.DISCARD
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


class Retention(NamedTuple):
    """When an idle key's state expires: its newest event time (`newest`) plus `ttl_ms`."""

    ttl_ms: int
    newest: Callable[[Any], int]

    def expires_ms(self, state: Any) -> int:
        try:
            return self.newest(state) + self.ttl_ms
        except Exception:  # the bookkeeping must never stop the stream: keep the state
            return now_ms() + self.ttl_ms


def _builder(
    new: Callable[[], S],
    fold: Callable[[S, list[V]], list[W]],
    retention: Retention | None = None,
) -> Callable[[bytes | None], FoldLogic[S, V, W]]:
    def build(resume: bytes | None) -> FoldLogic[S, V, W]:
        if resume is None:
            return FoldLogic(new(), fold, new, retention)
        state = pickle.loads(resume)
        restored = getattr(state, "restored", None)
        if restored is not None:
            restored()  # rows written after this snapshot are unknown: rewrite them
        return FoldLogic(state, fold, new, retention)

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


def _needs_stitch(item: Positioned, identify: frozenset[str]) -> bool:
    event = item[2]
    if event.anonymous_id is None:
        return False
    return event.user_id is None or event.type in identify


def build_flow(
    settings: Settings,
    spec: Spec,
    *,
    source: Source[SourceItem] | None = None,
    sinks: StreamSinks | None = None,
    catalog: ItemCatalog | None = None,
    tail: bool = True,
) -> Dataflow:
    """The streaming dataflow for `spec`; defaults read `settings` (log or Kafka, the
    three stores, the stores' item catalog). `tail=False` stops at the current end."""
    plan = FeaturePlan.from_spec(spec)
    identify = frozenset(spec.identify_events())
    item_types = plan.item_event_types()
    items = catalog if catalog is not None else StoreCatalog(settings, spec)
    out = sinks if sinks is not None else StreamSinks.from_settings(settings, spec)
    pii_key = settings.pseudonymization_key.get_secret_value().encode()
    needs_items = _needs_catalog(plan) or bool(plan.online.enabled and plan.online.group_attrs)

    @functools.lru_cache(maxsize=STATE_KEYS_CACHED)
    def skey(actor: str) -> str:  # an HMAC per event and step otherwise
        return state_key(pii_key, actor)

    def lookup(item_id: str | None) -> Any:
        return items.item(item_id) if item_id is not None and needs_items else None

    flow = Dataflow(f"nextbest_{spec.name}")
    src = source if source is not None else source_from_settings(settings, tail=tail)
    raw = op.input(sid("input", "events"), flow, src)
    ahead_ms = int(settings.stream_max_ahead_s * 1000)

    def parse(item: SourceItem) -> Record:
        return parse_record(item, spec, pii_key=pii_key, max_ahead_ms=ahead_ms)

    records = op.map(sid("parse", "records"), raw, parse)
    consent = StreamConsent(settings, spec, pii_key) if spec.privacy.consent else None
    if consent is not None:  # records producers wrote past the API (pipelines.consent)

        def judge(record: Record) -> Record | None:
            try:
                return consent(record)
            except Exception as exc:
                return failed(record.partition, record.offset, record.body, exc, "consent")

        records = op.filter_map(sid("consent", "records"), records, judge)

    lake = op.map(sid("key", "lake"), records, lambda r: (str(r.partition), r))
    dead: list[Any] = []  # streams of (partition, dead Record) from the steps below

    events = op.filter_map(sid("select", "events"), records, _event_of)
    erasures = op.filter_map(
        sid("select", "erasures"), records, lambda r: r.body if r.kind == "erase" else None
    )
    learns = plan.online.enabled  # a property: not once per record
    feedback = op.filter_map(
        sid("select", "feedback"), records, lambda r: _feedback_of(r) if learns else None
    )
    retention = _retention(plan)

    # -- item entity features (trending) -------------------------------------------
    updates: list[Any] = []
    if plan.item_windows:
        by_item = op.filter_map(
            sid("key", "item"),
            events,
            lambda x: (x[2].item_id, x) if x[2].item_id and x[2].type in item_types else None,
        )

        def item_fold(profile: ItemProfile, batch: list[Positioned]) -> list[Update | Record]:
            item_id = batch[0][2].item_id or ""
            out: list[Update | Record] = []
            offered: Touched = {}
            source: tuple[int, int] = (-1, -1)
            try:
                item = lookup(item_id)
            except Exception as exc:
                return [failed(p, o, e, exc, "state_item") for p, o, e in batch]
            for partition, offset, event in batch:  # one bad record costs no other
                try:
                    profile.add(plan, event, item, offered)
                    source = max(source, (partition, offset))
                except Exception as exc:
                    out.append(failed(partition, offset, event, exc, "state_item"))
            if source[0] < 0:
                return out
            try:
                rows = profile.rows(item_id, offered, source)
                if rows:
                    out.append(Update(rows))
            except Exception as exc:
                out.extend(failed(p, o, e, exc, "state_item_rows") for p, o, e in batch)
            return out

        item_updates = op.stateful_batch(
            sid("state", "item"),
            by_item,
            _builder(ItemProfile, item_fold, retention and retention._replace(newest=_item_ms)),
        )
        item_split = op.branch(sid("route", "dead_item"), item_updates, _is_dead)
        dead.append(item_split.trues)
        updates.append(item_split.falses)

    # -- identity stitching ----------------------------------------------------------
    personal = (
        events
        if consent is None  # anonymized and consent events build no per-user state
        else op.filter(sid("select", "personal"), events, lambda x: consent.personal(x[2]))
    )
    routes = op.branch(sid("route", "identity"), personal, lambda x: _needs_stitch(x, identify))
    anonymous = op.key_on(
        sid("key", "anonymous"), routes.trues, lambda x: skey(f"anon:{x[2].anonymous_id}")
    )
    # Feedback reaches the same keys as events: an `anon:` user's through the stitch step.
    feedback_routes = op.branch(
        sid("route", "feedback"), feedback, lambda x: x[2].user_id.startswith("anon:")
    )
    anonymous_feedback = op.key_on(
        sid("key", "anonymous_feedback"), feedback_routes.trues, lambda x: skey(x[2].user_id)
    )
    known_feedback = op.map(
        sid("key", "user_feedback"),
        feedback_routes.falses,
        lambda x: (skey(x[2].user_id), Routed(x[2].user_id, x[0], x[1], x[2])),
    )
    anonymous_erasures = op.flat_map(
        sid("key", "anonymous_erasures"),
        erasures,
        lambda e: [(skey(f"anon:{a}"), e) for a in e.anonymous_ids],
    )

    def stitch_fold(state: StitchState, batch: list[Incoming]) -> list[Routed | Record]:
        return stitch(state, batch, identify)

    stitched = op.stateful_batch(
        sid("stitch", "identity"),
        op.merge(sid("merge", "anonymous"), anonymous, anonymous_erasures, anonymous_feedback),
        _builder(StitchState, stitch_fold, retention and retention._replace(newest=_stitch_ms)),
    )
    stitch_split = op.branch(sid("route", "dead_stitch"), stitched, _is_dead)
    dead.append(stitch_split.trues)
    routed: Stream[tuple[str, Routed]] = stitch_split.falses  # type: ignore[assignment]
    rekeyed = op.map(sid("rekey", "stitched"), routed, lambda kv: (skey(kv[1].actor), kv[1]))
    known = op.map(
        sid("key", "user"),
        routes.falses,
        lambda x: (skey(x[2].actor), Routed(x[2].actor, x[0], x[1], x[2])),
    )
    # Anonymous events before an identify also built state under `anon:<id>` actors.
    user_erasures = op.flat_map(
        sid("key", "user_erasures"),
        erasures,
        lambda e: [(skey(a), e) for a in (e.user_id, *(f"anon:{x}" for x in e.anonymous_ids))],
    )
    actors = op.merge(sid("merge", "actors"), known, rekeyed, user_erasures, known_feedback)

    # -- per-user state ----------------------------------------------------------------
    def user_fold(profile: UserProfile, batch: list[Routed]) -> list[Update | Record]:
        actor = batch[0].actor
        offered: Touched = {}
        aliases: list[Alias] = []
        newest: tuple[int, int] = (-1, -1)
        out: list[Update | Record] = []
        for routed in batch:  # one bad record must not cost the others of the batch
            event = routed.event
            try:
                if isinstance(event, Feedback):
                    profile.learn(plan, event, lookup(event.item_id))
                else:
                    profile.fold(plan, event, lookup(event.item_id), offered)
                    if routed.link and event.anonymous_id is not None:
                        aliases.append(Alias(event.anonymous_id, actor, event.ts_ms))
                newest = max(newest, (routed.partition, routed.offset))
            except Exception as exc:
                out.append(failed(routed.partition, routed.offset, event, exc, "state_user"))
        if newest[0] < 0:
            return out
        try:
            out.append(_user_update(plan, profile, actor, offered, aliases, newest, items))
        except Exception as exc:  # e.g. a vector that cannot be computed: nothing written
            out.extend(
                failed(r.partition, r.offset, r.event, exc, "state_user_rows") for r in batch
            )
        return out

    user_states = op.stateful_batch(
        sid("state", "user"),
        actors,
        _builder(UserProfile, user_fold, retention and retention._replace(newest=_user_ms)),
    )
    user_split = op.branch(sid("route", "dead_user"), user_states, _is_dead)
    dead.append(user_split.trues)
    user_updates: Stream[tuple[str, Update]] = user_split.falses  # type: ignore[assignment]
    updates.append(user_updates)

    merged = op.merge(sid("merge", "updates"), *updates) if len(updates) > 1 else updates[0]
    online = op.map(sid("unkey", "updates"), merged, lambda kv: kv[1])
    op.output(sid("sink", "online"), online, out.online)

    failures = op.map(
        sid("key", "dead"),
        op.merge(sid("merge", "dead"), *dead),
        lambda kv: (str(kv[1].partition), kv[1]),
    )
    op.output(sid("sink", "lake"), op.merge(sid("merge", "lake"), lake, failures), out.lake)

    vectors = op.filter_map(
        sid("select", "user_vectors"),
        user_updates,
        lambda kv: (VECTORS_PART, kv[1].vector_row) if kv[1].vector_row is not None else None,
    )
    vector_erasures = op.map(
        sid("select", "vector_erasures"), erasures, lambda e: (VECTORS_PART, erase_marker(e))
    )
    op.output(
        sid("sink", "user_vectors"),
        op.merge(sid("merge", "vectors"), vectors, vector_erasures),
        out.vectors,
    )
    return flow


def state_key(pii_key: bytes, actor: str) -> str:
    """The Bytewax state key of an actor: a keyed hash, so recovery files never hold ids."""
    return keyed_hash(pii_key, f"state:{actor}")


def _event_of(record: Record) -> Positioned | None:
    if record.kind != "event":
        return None
    return (record.partition, record.offset, record.body)


def _feedback_of(record: Record) -> tuple[int, int, Feedback] | None:
    if record.kind != "feedback":
        return None
    feedback = Feedback.from_row(record.body)
    return None if feedback is None else (record.partition, record.offset, feedback)


def _needs_catalog(plan: FeaturePlan) -> bool:
    """Whether any feature reads item attributes (group_by or an attribute field)."""
    attrs = set(plan.spec.entities.item.attributes)
    for feature in [*plan.user_windows.values(), *plan.item_windows.values()]:
        if feature.group_by is not None or feature.field in attrs:
            return True
    return False


def _is_dead(kv: tuple[str, Any]) -> bool:
    return isinstance(kv[1], Record)


def _user_update(
    plan: FeaturePlan,
    profile: UserProfile,
    actor: str,
    offered: Touched,
    aliases: list[Alias],
    newest: tuple[int, int],
    items: ItemCatalog,
) -> Update:
    """What one batch of an actor's records writes: feature rows, state, vector."""
    vector = profile.session_vector(plan, items.vectors()) if plan.session_vector else None
    rows = profile.feature_rows(plan, actor, offered, newest)
    state = profile.user_state(plan, actor, vector)
    vector_row = None
    if vector is not None:
        event_ts = datetime.fromtimestamp(state.event_ts_ms / 1000, tz=UTC)
        vector_row = {"user_id": actor, "vector": vector, "event_ts": event_ts}
    return Update(rows, state, aliases, vector_row)


def _retention(plan: FeaturePlan) -> Retention | None:
    """The spec's `state.ttl`, never shorter than the longest window (see StateRetention)."""
    ttl = plan.spec.state.ttl
    if ttl is None:
        return None
    longest = max(plan.window_ms.values(), default=0)
    return Retention(max(int(ttl.seconds * 1000), longest), _user_ms)


def _user_ms(profile: UserProfile) -> int:
    online = profile.online
    return max(profile.latest[0], online.anchor_ms if online is not None else -1)


def _item_ms(profile: ItemProfile) -> int:
    return max((w.anchor_ms or -1 for w in profile.windows.values()), default=-1)


def _stitch_ms(state: StitchState) -> int:
    return getattr(state, "newest_ms", -1)
