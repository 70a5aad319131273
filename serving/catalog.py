"""Item attributes changed over HTTP, kept current in every API process.

Why this design (`PUT /v1/items`): the change must reach the next decision of every
API process within seconds, survive restarts, and leave a history in Delta.

- **Durable and shared: the online store.** A request's updates are merged into
  `nb_item_attributes` (`storage.online.items`) in one transaction, each change
  numbered by a catalogue-wide `seq`. Every API process already reads this store,
  on SQLite or PostgreSQL, so no new service is needed.
- **History: Delta `item_updates`** (`storage.delta.item_updates`), appended by the
  API in the same request, before the online write: a row per item with the request's
  `update_id`. The history is therefore a superset of what was applied; when the
  online write then fails the client gets a 503, and its retry applies the change
  (and records it once more, with a new `update_id`). Not through the event log and
  the stream: that would need a new record kind in the stream, and the catalogue
  would still need the online write to be visible without the stream running.
- **In memory: an overlay.** The Delta `items` catalog (`nextbest import items`) is the
  base; each process lays the stored rows over it when it loads attributes, then
  polls `seq > last seen` on its refresh loop (every `REFRESH_INTERVAL_S`) and swaps in
  an `Assets` with only the changed items' attributes and eligibility recomputed
  (`Assets.with_attributes`). The process that took the request applies it at once.
"""

import logging
from typing import Any

from nextbest.decide.decision import Assets
from nextbest.spec.models import Spec
from storage.online.items import ItemAttributeStore

log = logging.getLogger(__name__)


class ItemOverlay:
    """The online store's item rows and the highest `seq` this process applied."""

    def __init__(self, store: ItemAttributeStore, spec: Spec) -> None:
        self.store = store
        self.names = set(spec.entities.item.attributes)
        self.seq = 0

    def laid_over(self, base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """`base` (the catalog) with every stored update merged in; remembers the seq."""
        try:
            changes = self.store.changes_since(0)
        except Exception as exc:  # the catalog alone; the next refresh retries
            log.warning("cannot read item attribute updates: %r", exc)
            return base
        for item, attrs in changes.items.items():
            base[item] = {**base.get(item, {}), **self._declared(attrs)}
        self.seq = changes.seq
        return base

    def apply_new(self, assets: Assets, spec: Spec) -> Assets | None:
        """`assets` with the updates stored since the last call, None when none."""
        changes = self.store.changes_since(self.seq)
        if not changes.items:
            return None
        updated = assets.with_attributes(
            {i: self._declared(a) for i, a in changes.items.items()}, spec=spec
        )
        self.seq = changes.seq
        return updated

    def _declared(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Only attributes the (possibly changed) spec still declares."""
        return {k: v for k, v in attrs.items() if k in self.names}
