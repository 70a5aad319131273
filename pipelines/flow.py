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
                          model (`SessionState.online_model`, same write)
    sink_online           Update                                 (OnlineStore upserts)
    sink_user_vectors     ("lance_users", users row)             (LanceDB, one writer)

A record that raises in any step (consent, a state step, stitching) becomes a dead
letter (`pipelines.stateful.failed`) that joins the lake sink's input, so it lands in
Delta `dead_letters` with the step and the reason, and the rest of its batch goes on:
a record that fails again on replay fails the same way, never the worker. The parse
step dead-letters what no store could keep (ids too long or with NUL, values beyond
`nextbest.features.windows.VALUE_BOUND`, events dated past `stream_max_ahead_s`).

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
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source

from nextbest.ingest.events import Event, anon_actor, anonymous_of, item_actor
from nextbest.ingest.validation import keyed_hash
from nextbest.learn.online_model import Feedback
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.catalog import ItemCatalog, StoreCatalog
from pipelines.consent import StreamConsent
from pipelines.erasure_recovery import GATE
from pipelines.profile import FeaturePlan, ItemProfile, Touched, UserProfile
from pipelines.records import Record, Routed, SourceItem, Update, parse_record
from pipelines.sinks import VECTORS_PART, StreamSinks, erase_marker
from pipelines.sources import source_from_settings
from pipelines.stateful import (
    FEEDBACK_BUFFER,
    STITCH_BUFFER,
    Codec,
    Expired,
    Incoming,
    Owner,
    StitchState,
    failed,
    retention_of,
    state_builder,
    stitch,
)
from pipelines.vector_sink import EXPIRED_MARKER
from storage.online.models import Alias

__all__ = ["FEEDBACK_BUFFER", "STITCH_BUFFER", "StitchState", "build_flow", "state_key", "stitch"]

USER_CODEC = Codec(UserProfile.snapshot, UserProfile.from_snapshot)
ITEM_CODEC = Codec(ItemProfile.snapshot, ItemProfile.from_snapshot)
"""Profiles snapshot as versioned msgpack (`nextbest.features.state`), never pickles."""

STATE_KEYS_CACHED = 1 << 16
"""Actors whose state key (a keyed hash) is remembered: the active users, typically."""

Positioned = tuple[int, int, Event]  # (partition, offset, event)


def sid(kind: str, name: str) -> str:
    return Spec.step_id(kind, name)


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
    src = GATE.wrap(source if source is not None else source_from_settings(settings, tail=tail))
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
            state_builder(
                ItemProfile, item_fold, retention_of(plan, ItemProfile), ITEM_CODEC, ITEM_OWNER
            ),
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
        sid("key", "anonymous"), routes.trues, lambda x: skey(anon_actor(str(x[2].anonymous_id)))
    )
    # Feedback reaches the same keys as events: an `anon:` user's through the stitch step.
    feedback_routes = op.branch(
        sid("route", "feedback"), feedback, lambda x: anonymous_of(x[2].user_id) is not None
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
        lambda e: [(skey(anon_actor(a)), e) for a in e.anonymous_ids],
    )

    def stitch_fold(state: StitchState, batch: list[Incoming]) -> list[Routed | Record]:
        return stitch(state, batch, identify)

    stitched = op.stateful_batch(
        sid("stitch", "identity"),
        op.merge(sid("merge", "anonymous"), anonymous, anonymous_erasures, anonymous_feedback),
        state_builder(StitchState, stitch_fold, retention_of(plan, StitchState)),
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
        lambda e: [(skey(a), e) for a in (e.user_id, *map(anon_actor, e.anonymous_ids))],
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
        state_builder(
            UserProfile, user_fold, retention_of(plan, UserProfile), USER_CODEC, USER_OWNER
        ),
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

    vectors = op.filter_map(sid("select", "user_vectors"), user_updates, _vector_row)
    vector_erasures = op.map(
        sid("select", "vector_erasures"), erasures, lambda e: (VECTORS_PART, erase_marker(e))
    )
    op.output(
        sid("sink", "user_vectors"),
        op.merge(sid("merge", "vectors"), vectors, vector_erasures),
        out.vectors,
    )
    return flow


USER_OWNER = Owner(lambda routed: routed.actor, lambda actor: [Expired(actor)])
ITEM_OWNER = Owner(lambda item: item_actor(str(item[2].item_id)), lambda actor: [Expired(actor)])
"""Whose state a key holds, so `state.ttl` forgets their online rows too (`Expired`)."""


def _vector_row(kv: tuple[str, Update | Expired]) -> tuple[str, dict[str, Any]] | None:
    if isinstance(kv[1], Expired):
        return (VECTORS_PART, {EXPIRED_MARKER: kv[1].actor})
    row = kv[1].vector_row
    return None if row is None else (VECTORS_PART, row)


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
