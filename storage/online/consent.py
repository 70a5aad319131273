"""The consent table of the online store and the cached reader the API and stream share.

`nb_consent` keeps each subject's latest consent decision (a user id or `anon:<id>`,
granted or not, and the event time of the consent event). A write keeps the newer
decision by event time, so the API (which applies a consent event before its 202) and
the stream (which applies it again from the log, and applies those a producer wrote
straight to Kafka) may both write, in any order, and a replay never restores an older
answer. Erasure deletes the subject's row with the rest of the user
(`OnlineStore.delete_user`): no user id may remain in any file, and a forgotten user
is back to the spec's default.

`ConsentCache` is a bounded LRU in front of the table that implements
`nextbest.ingest.consent.ScreenState`. With a `ttl_s` entries are re-read after it, so a
decision recorded by another process is seen within that time; without one entries
change only through `apply`/`link`/`forget`. A read never replaces a live cached
decision with an older one (by event time), so a read that started before a concurrent
`apply` cannot undo it; likewise a read that finds no link keeps a link `link` cached (an
identify the stream has not stored yet), while a link the store holds wins.
"""

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from nextbest.ingest.consent import ConsentChange, allowed, newest, prefetch_keys
from nextbest.ingest.events import Event, anonymous_of
from nextbest.spec.models import Consent
from storage.online.engine import write_engine
from storage.online.models import now_ms
from storage.online.sql import id_chunks, linked_users, upsert

T = TypeVar("T")


class ConsentTable(SQLModel, table=True):
    """A subject's latest consent decision; `user_id` is a user id or `anon:<id>`."""

    __tablename__ = "nb_consent"  # pyright: ignore[reportAssignmentType]

    user_id: str = Field(primary_key=True, max_length=256)
    granted: bool
    ts_ms: int = Field(sa_type=sa.BigInteger)
    updated_at_ms: int = Field(sa_type=sa.BigInteger)


CONSENT = SQLModel.metadata.tables["nb_consent"]


class ConsentStore:
    """Reads and newest-wins writes of `nb_consent` on the online store's engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._writer = write_engine(engine)

    def record(self, changes: Sequence[ConsentChange]) -> int:
        """Store decisions, keeping per subject the newest by event time; one
        transaction, so it is durable when this returns. Returns subjects written."""
        latest: dict[str, ConsentChange] = {}
        for change in changes:
            latest[change.subject] = newest(latest.get(change.subject), change) or change
        if not latest:
            return 0
        now = now_ms()
        rows = [
            {"user_id": c.subject, "granted": c.granted, "ts_ms": c.ts_ms, "updated_at_ms": now}
            for c in latest.values()
        ]
        with self._writer.begin() as conn:
            return upsert(conn, CONSENT, rows, where=lambda new: CONSENT.c.ts_ms <= new.ts_ms)

    def get_many(self, subjects: Iterable[str]) -> dict[str, ConsentChange]:
        out: dict[str, ConsentChange] = {}
        with self.engine.connect() as conn:
            for ids in id_chunks(subjects):
                stmt = sa.select(CONSENT.c.user_id, CONSENT.c.granted, CONSENT.c.ts_ms).where(
                    CONSENT.c.user_id.in_(ids)
                )
                for subject, granted, ts in conn.execute(stmt):
                    out[subject] = ConsentChange(subject, bool(granted), int(ts))
        return out

    def get(self, subject: str) -> ConsentChange | None:
        return self.get_many([subject]).get(subject)

    def links(self, anonymous_ids: Iterable[str]) -> dict[str, str]:
        """anonymous id -> the user an identify event linked it to."""
        with self.engine.connect() as conn:
            return linked_users(conn, anonymous_ids)


class _Lru(Generic[T]):
    """key -> (value, expires at), least recently used first out."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.data: OrderedDict[str, tuple[T | None, float]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, T | None]:
        hit = self.data.get(key)
        if hit is None or hit[1] < now:
            return False, None
        self.data.move_to_end(key)
        return True, hit[0]

    def peek(self, key: str) -> T | None:
        """The value held, expired or not (None when absent)."""
        hit = self.data.get(key)
        return None if hit is None else hit[0]

    def put(self, key: str, value: T | None, expires: float) -> None:
        self.data[key] = (value, expires)
        self.data.move_to_end(key)
        while len(self.data) > self.max_entries:
            self.data.popitem(last=False)


class ConsentCache:
    """`ScreenState` over a `ConsentStore`: thread-safe, bounded, optionally expiring."""

    def __init__(
        self,
        store: ConsentStore,
        *,
        ttl_s: float | None = 1.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._rows: _Lru[ConsentChange] = _Lru(max_entries)
        self._links: _Lru[str] = _Lru(max_entries)

    def _expires(self) -> float:
        return math.inf if self.ttl_s is None else self.clock() + self.ttl_s

    def prefetch(
        self,
        subjects: Iterable[str] = (),
        anonymous_ids: Iterable[str] = (),
        *,
        fresh: bool = False,
    ) -> None:
        """Load what is not cached (everything with `fresh`) in at most three queries."""
        now = self.clock()
        with self._lock:
            rows = [s for s in dict.fromkeys(subjects) if fresh or not self._rows.get(s, now)[0]]
            anons = [
                a for a in dict.fromkeys(anonymous_ids) if fresh or not self._links.get(a, now)[0]
            ]
        links = self.store.links(anons) if anons else {}
        users = [u for u in dict.fromkeys(links.values()) if u not in rows]
        found = self.store.get_many([*rows, *users]) if rows or users else {}
        expires = self._expires()
        with self._lock:
            for a in anons:
                self._put_link(a, links.get(a), expires)
            for s in [*rows, *users]:
                self._put_row(s, found.get(s), expires)

    def prefetch_events(self, events: Iterable[Event], *, fresh: bool = False) -> None:
        """`prefetch` what judging `events` reads (`nextbest.ingest.consent.prefetch_keys`):
        the one read before a batch is screened, at the API, the importer and the stream."""
        subjects, anonymous_ids = prefetch_keys(events)
        self.prefetch(subjects, anonymous_ids, fresh=fresh)

    def commit(
        self, changes: Sequence[ConsentChange] = (), links: Mapping[str, str] | None = None
    ) -> None:
        """What screening decided, in the one order: record the decisions (durable when
        this returns; raises when the store cannot), then cache them, then cache the
        identity links (anonymous id -> user) until the stream stores them."""
        if changes:
            self.store.record(changes)
            for change in changes:
                self.apply(change)
        for anonymous_id, user_id in (links or {}).items():
            self.link(anonymous_id, user_id)

    def _put_row(self, subject: str, read: ConsentChange | None, expires: float) -> None:
        """Cache what was read, unless an `apply` meanwhile cached a newer decision (an
        expired entry yields: the store is then the newer, e.g. after an erasure)."""
        hit, current = self._rows.get(subject, self.clock())
        self._rows.put(subject, newest(current, read) if hit else read, expires)

    def _put_link(self, anonymous_id: str, read: str | None, expires: float) -> None:
        """Cache what was read; a link `link` cached stays until the store has one."""
        self._links.put(anonymous_id, read or self._links.peek(anonymous_id), expires)

    def stored(self, subject: str) -> ConsentChange | None:
        with self._lock:
            hit, value = self._rows.get(subject, self.clock())
        if hit:
            return value
        value = self.store.get(subject)
        with self._lock:
            self._put_row(subject, value, self._expires())
            return self._rows.peek(subject)

    def linked_user(self, anonymous_id: str) -> str | None:
        with self._lock:
            hit, value = self._links.get(anonymous_id, self.clock())
        if hit:
            return value
        value = self.store.links([anonymous_id]).get(anonymous_id)
        with self._lock:
            self._put_link(anonymous_id, value, self._expires())
            return self._links.peek(anonymous_id)

    def apply(self, change: ConsentChange) -> None:
        """Cache a decision just recorded or seen (the newer of it and the stored one)."""
        self.stored(change.subject)  # the stored decision may be newer
        with self._lock:
            self._put_row(change.subject, change, self._expires())

    def link(self, anonymous_id: str, user_id: str) -> None:
        """Cache an identify's link unless one is known (the first link wins)."""
        with self._lock:
            current = self._links.peek(anonymous_id)
            self._links.put(anonymous_id, current or user_id, self._expires())

    def forget(self, actors: Iterable[str]) -> None:
        """Erasure: drop what is cached about these actors."""
        gone = set(actors)
        with self._lock:
            for actor in gone:
                self._rows.data.pop(actor, None)
                anonymous = anonymous_of(actor)
                if anonymous is not None:
                    self._links.data.pop(anonymous, None)
            for anon, (user, _) in list(self._links.data.items()):
                if user in gone:
                    del self._links.data[anon]

    def allowed(self, actor: str, consent: Consent) -> bool:
        """Whether `actor` consents now (may read the store)."""
        return allowed(self, actor, consent)

    def peek(self, actor: str, consent: Consent) -> bool | None:
        """`allowed` from the cache alone; None when the store would have to be read."""
        now = self.clock()
        anonymous = anonymous_of(actor)
        with self._lock:
            if anonymous is not None:
                hit, user = self._links.get(anonymous, now)
                if not hit:
                    return None
                if user is not None:
                    hit, row = self._rows.get(user, now)
                    if not hit:
                        return None
                    if row is not None:
                        return row.granted
            hit, row = self._rows.get(actor, now)
        if not hit:
            return None
        return row.granted if row is not None else consent.default == "granted"
