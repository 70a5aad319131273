"""Consent (spec `privacy.consent`) for `nextbest import events`: the API's rules.

An import writes straight to bronze, past the API and the stream, so it screens each
chunk with `nextbest.ingest.consent.screen` itself, in file order, against the online store's
`nb_consent` answers plus those met earlier in the file (one cache for the whole file):
a consent event followed by the subject's events keeps them, a revoke drops (or, with
`aggregate`, anonymizes) what follows it. The file's consent events, and the answers an
identify copies, are recorded in `nb_consent` before their chunk is appended. The table
keeps the newest answer by event time, so re-importing a file never restores an older
answer; and a chunk's boundaries depend on the file alone (validated events), so a
resumed import appends exactly the chunks it had not yet written.

The newest answer wins, as at the API: an answer stored later than an imported event
(recorded live, or by an earlier import of the same file) judges it too, so history of
someone who revoked since is not loaded.
"""

from collections.abc import Sequence

from nextbest.ingest.consent import Screened, screen
from nextbest.ingest.events import Event
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.online.consent import ConsentCache, ConsentStore
from storage.online.store import OnlineStore

MAX_CACHED = 1_000_000
"""Answers and links held for one import (links made by the file exist only here)."""


class ImportConsent:
    """Screens an import's chunks in order and records their consent answers."""

    def __init__(self, settings: Settings, spec: Spec) -> None:
        assert spec.privacy.consent is not None
        self.spec = spec
        self.key = settings.pseudonymization_key.get_secret_value().encode()
        self.online = OnlineStore.from_settings(settings, pool_size=1)
        # No expiry: within one import the answers change only through this file.
        self.cache = ConsentCache(
            ConsentStore(self.online.engine), ttl_s=None, max_entries=MAX_CACHED
        )
        self.dropped = self.aggregated = self.recorded = 0

    def keep(self, events: Sequence[Event]) -> list[Event]:
        """What of a chunk to append (marked or anonymized), counting what is not."""
        screened = self.screen(events)
        self.dropped += len(screened.dropped)
        self.aggregated += len(screened.aggregated)
        return [e for _, e in screened.kept]

    def screen(self, events: Sequence[Event]) -> Screened:
        """Judge a chunk (kept events are marked as the API marks them) and store the
        answers it holds before the caller appends the chunk."""
        self.cache.prefetch_events(events)
        screened = screen(events, self.spec, self.cache, self.key)
        self.cache.commit(screened.changes, screened.links)
        self.recorded += len(screened.changes)
        return screened

    def close(self) -> None:
        self.online.dispose()
