"""Event ids already in Delta bronze, per source partition, for the lake sink.

Offsets make a replay idempotent, but not a client retry: when the API makes a batch
durable and dies before its 202, the client sends the same events again and they get
new offsets. The same event id always lands in the same partition (the log is keyed by
user), so remembering the last ids written per partition is enough to drop them.
The memory is rebuilt from Delta on the first write after a start, so it needs no
recovery state of its own.
"""

from collections import OrderedDict

from storage.delta.store import DeltaStore

RECENT_IDS = 200_000  # per partition: far more than a retry window at any realistic rate


class RecentIds:
    def __init__(self, store: DeltaStore, *, capacity: int = RECENT_IDS) -> None:
        self._store = store
        self._capacity = capacity
        self._ids: dict[int, OrderedDict[str, None]] = {}

    def _load(self, partition: int) -> OrderedDict[str, None]:
        ids: OrderedDict[str, None] = OrderedDict()
        if self._store.exists("events"):
            rows = self._store.read(
                "events",
                columns=["event_id", "source_offset"],
                filters=[("source_partition", "=", partition)],
            ).sort_by("source_offset")
            for event_id in rows.column("event_id").to_pylist()[-self._capacity :]:
                ids[event_id] = None
        self._ids[partition] = ids
        return ids

    def fresh(self, partition: int, event_ids: list[str]) -> list[bool]:
        """For each id, whether it is new (and remember it); repeats in the list count."""
        ids = self._ids.get(partition)
        if ids is None:
            ids = self._load(partition)
        out = []
        for event_id in event_ids:
            new = event_id not in ids
            out.append(new)
            if new:
                ids[event_id] = None
                if len(ids) > self._capacity:
                    ids.popitem(last=False)
        return out
