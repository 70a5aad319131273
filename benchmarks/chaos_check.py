"""The crash harness's verdict: bronze against what the API acknowledged, and a way to
prove the verdict can fail.

Shared by `benchmarks/chaos.py` and `tests/e2e/test_chaos.py`. The online-state half of the
check is `tests.support.stream_helpers.online_mismatches` (batch recomputation from Delta).
"""

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from nextbest.settings import Settings
from storage.delta.store import DeltaStore

EVENTS = "events"
Target = Literal["stream", "api"]


@dataclass(frozen=True)
class BronzeCheck:
    """`duplicates`: event id -> rows in bronze (> 1); `losses`: acknowledged (202) ids
    missing from bronze; `extras`: bronze ids never acknowledged (a batch appended but
    whose 202 never reached the client, and which the client then gave up on)."""

    rows: int
    acknowledged: int
    duplicates: dict[str, int] = field(default_factory=dict)
    losses: frozenset[str] = frozenset()
    extras: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.duplicates and not self.losses


def check_bronze(acknowledged: Iterable[str], bronze_ids: Sequence[str]) -> BronzeCheck:
    """Every acknowledged id exactly once in bronze."""
    acked = set(acknowledged)
    counts = Counter(bronze_ids)
    present = set(counts)
    return BronzeCheck(
        rows=len(bronze_ids),
        acknowledged=len(acked),
        duplicates={i: n for i, n in counts.items() if n > 1},
        losses=frozenset(acked - present),
        extras=frozenset(present - acked),
    )


def bronze_ids(settings: Settings) -> list[str]:
    delta = DeltaStore.from_settings(settings)
    if not delta.exists(EVENTS):
        return []
    return delta.read(EVENTS, columns=["event_id"]).column("event_id").to_pylist()


class BronzeProgress:
    """The highest source offset bronze has committed per log partition, read from the
    Delta transaction versions the stream records (docs/architecture.md#replays).
    Keeps one table handle and refreshes it incrementally, so polling stays cheap."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self._delta = DeltaStore.from_settings(settings)
        self._options = dict(settings.storage_options)
        self._partitions = partitions
        self._table: DeltaTable | None = None

    def offsets(self) -> dict[int, int]:
        if self._table is None:
            if not self._delta.exists(EVENTS):
                return {p: -1 for p in range(self._partitions)}
            self._table = DeltaTable(self._delta.uri(EVENTS), storage_options=self._options)
        else:
            self._table.update_incremental()
        out = {}
        for p in range(self._partitions):
            version = self._table.transaction_version(f"bronze-p{p}")
            out[p] = -1 if version is None else version
        return out


def inject_replay_duplicates(
    settings: Settings, *, rows: int, seed: int, app_id: str = "bronze-unguarded"
) -> list[str]:
    """Append a replayed copy of committed bronze rows under a fresh app id: what a sink
    without the transaction-version guard writes when Bytewax replays an epoch after a
    crash. Picks one contiguous offset range per partition (a replayed epoch is
    contiguous); returns the duplicated event ids."""
    delta = DeltaStore.from_settings(settings)
    table = delta.read(EVENTS)
    rng = random.Random(seed)
    parts = sorted(set(table.column("source_partition").to_pylist()))
    per_part = max(1, rows // max(1, len(parts)))
    chunks: list[pa.Table] = []
    for p in parts:
        mine = table.filter(pc.field("source_partition") == p)
        mine = mine.sort_by("source_offset")
        n = min(per_part, mine.num_rows)
        start = rng.randrange(0, mine.num_rows - n + 1)
        chunks.append(mine.slice(start, n))
    replay = pa.concat_tables(chunks)
    delta.append(EVENTS, replay, app_id=app_id, batch_version=0)
    return replay.column("event_id").to_pylist()


@dataclass(frozen=True)
class ChaosConfig:
    events: int = 100_000
    stream_kills: int = 10
    api_kills: int = 3
    seed: int = 7
    batch_size: int = 500
    no_idempotency: bool = False
    injected_rows: int = 200
    rate: float | None = None  # events/s offered; None: spread over the expected chaos
    timeout_s: float = 900.0


@dataclass
class Kill:
    target: Target
    at_s: float  # since the replay started
    recover_s: float  # restart -> API answers / stream commits new bronze rows
    live: bool  # the client was still sending


@dataclass
class ChaosResult:
    config: ChaosConfig
    replayed: int = 0
    acknowledged: set[str] = field(default_factory=set)
    retried_batches: int = 0
    failed_restarts: int = 0
    ambiguous_ids: set[str] = field(default_factory=set)
    kills: list[Kill] = field(default_factory=list)
    check: BronzeCheck | None = None
    mismatches: list[str] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)
    injected_check: BronzeCheck | None = None
    replay_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0

    def kills_of(self, target: Target) -> list[Kill]:
        return [k for k in self.kills if k.target == target]

    def lines(self) -> list[str]:
        assert self.check is not None
        out = []
        for target in ("stream", "api"):
            ks = self.kills_of(target)  # type: ignore[arg-type]
            rec = ", ".join(f"{k.recover_s:.2f}" for k in ks)
            live = sum(k.live for k in ks)
            out.append(
                f"{target} kills survived: {len(ks)} ({live} while events were arriving); "
                f"recovery s: {rec}"
            )
        c = self.check
        out += [
            f"events replayed: {self.replayed}",
            f"accepted (202): {len(self.acknowledged)}",
            f"batches retried: {self.retried_batches} "
            f"({len(self.ambiguous_ids)} events in batches sent but unanswered)",
            f"restarts that exited on start-up (started again): {self.failed_restarts}",
            f"bronze rows: {c.rows}",
            f"duplicates found: {len(c.duplicates)}",
            f"losses found: {len(c.losses)}",
            f"unacknowledged extras: {len(c.extras)}",
            f"online features != batch recomputation: {len(self.mismatches)}",
        ]
        if self.injected_check is not None:
            found = set(self.injected_check.duplicates)
            out.append(
                f"--no-idempotency: injected {len(set(self.injected))} replayed rows, "
                f"checker found {len(found)} duplicates, exactly those: "
                f"{found == set(self.injected)}"
            )
        out.append(
            f"time: replay {self.replay_s:.1f} s, drain {self.drain_s:.1f} s, "
            f"total {self.total_s:.1f} s"
        )
        return out
