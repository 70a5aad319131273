"""Consent in the stream (spec `privacy.consent`): the API's rules for records that did
not come through the API (a producer writing straight to Kafka).

`StreamConsent` runs right after the parse step, as a `filter_map`:
- consent events are recorded in the online store's consent table (newest wins, so
  re-applying the API's own or a replayed one is harmless) and in the cache;
- events the API already judged (a valid `nextbest.ingest.consent.MARK`, or anonymized; both
  keyed hashes of the event id, so a producer cannot forge them) pass unchanged, so the
  stream never drops or rewrites an event that got a 202;
- any other event is judged as the API would: kept, anonymized (`aggregate`) or
  dropped (None: it reaches neither Delta nor the online store); an identify event
  judged here records the answer its other side inherits, as the API does;
- feedback of a user without consent loses its `user_id` (the decision id still joins
  it to the logged decision), so no per-user state is learnt from it;
- an erasure request forgets the user in the cache.

Ordering caveat: the cache is filled from the store and re-read every `CACHE_TTL_S`,
so a decision recorded elsewhere (the API, another worker or partition) is seen within
that time; between re-reads it changes with the consent events this worker reads, in
log order. The store holds the latest answer, which may be newer than the records being
processed (a replay, a lagging partition): a producer's event written before a revoke
may be judged by that revoke, and one written after a grant the store has not seen yet
is judged by the older answer. An anonymous visitor's identify event sits in the user's
partition, so another worker may judge that visitor's unmarked events before it has
seen the link. Events from the API are not affected (they are marked).
"""

import threading
from typing import Any

from nextbest.ingest.consent import Overlay, anonymize, change_of, is_anonymized, judged, verdict
from nextbest.ingest.events import Event, anon_actor
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.records import Erase, Record
from storage.online.consent import ConsentCache, ConsentStore
from storage.online.store import OnlineStore

CACHE_TTL_S = 5.0
"""How long the stream trusts a cached consent answer or link before re-reading it."""


class StreamConsent:
    """Callable for `op.filter_map` over parsed records; opens the store on first use."""

    def __init__(
        self, settings: Settings, spec: Spec, key: bytes, *, cache: ConsentCache | None = None
    ) -> None:
        assert spec.privacy.consent is not None
        self.settings = settings
        self.spec = spec
        self.consent = spec.privacy.consent
        self.key = key
        self._cache = cache
        self._lock = threading.Lock()

    @property
    def cache(self) -> ConsentCache:
        with self._lock:  # workers of one process share this object
            if self._cache is None:
                online = OnlineStore.from_settings(self.settings, pool_size=1)
                self._cache = ConsentCache(ConsentStore(online.engine), ttl_s=CACHE_TTL_S)
            return self._cache

    def personal(self, event: Event) -> bool:
        """Whether the event may build per-user state: not anonymized, and not a consent
        event (the record of a choice is not behaviour)."""
        return not is_anonymized(event, self.key) and event.type != self.consent.event

    def __call__(self, record: Record) -> Record | None:
        if record.kind == "erase":
            erase: Erase = record.body
            self.cache.forget([erase.user_id, *(anon_actor(a) for a in erase.anonymous_ids)])
            return record
        if record.kind == "feedback":
            return self._feedback(record)
        if record.kind != "event":
            return record
        event = record.body
        change = change_of(event, self.consent)
        if change is not None:
            self.cache.commit([change])
            return record
        if judged(event, self.key):
            identify = event.type in self.spec.identify_events()
            if identify and event.anonymous_id is not None and event.user_id is not None:
                self.cache.commit(links={event.anonymous_id: event.user_id})
            return record
        overlay = Overlay(self.cache)
        judgement = verdict(event, self.spec, self.consent, overlay, self.key)
        self.cache.commit(overlay.recorded, overlay.links)  # an identify's inherited answer
        if judgement == "keep":
            return record
        if judgement == "aggregate":
            return record._replace(body=anonymize(event, self.spec, self.key))
        return None

    def _feedback(self, record: Record) -> Record:
        row: dict[str, Any] = record.body
        user = row.get("user_id")
        if user is None or self.cache.allowed(user, self.consent):
            return record
        return record._replace(body={**row, "user_id": None})
