"""Decisions for users without consent (spec `privacy.consent`): not personalized.

Such a user gets what an unknown visitor gets: no online features, history, session
vector or cached (per-user, batch-computed) decision is read, only trending and
popular-in-context candidates, `served_from: fallback`, and every action says why.
Actions with a cap are left out: counting them would keep per-user state. The check
reads the API's consent cache (`storage.online.consent.ConsentCache`, written through
by ingest); on a miss one point read runs in a worker thread within the latency
budget, and a read that fails or overruns counts as no consent. The decision is logged
without the person: no feature values, no requested user id, and in place of the user
id `unlogged_actor` (the decision log's Delta table requires one), which is also the
log key; feedback for it joins on decision_id.

With several API processes (`settings.api_workers` > 1) the `ConsentGate` makes judging
the same whichever worker takes a batch: judge + append + record run under one file
lock for the whole home, and a counter in that file tells a worker that another one
recorded answers since it read the store (it reads again under the lock, and its
decisions drop their cached answers before judging the next one).
"""

import contextlib
import dataclasses
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread

from nextbest.decide.candidates import UserView
from nextbest.decide.decision import Outcome
from nextbest.ingest.consent import NO_CONSENT_PREFIX
from nextbest.settings import Settings
from nextbest.spec.models import Policy
from serving.runtime import ServingRuntime
from storage.online.consent import ConsentCache

NOT_PERSONALIZED = "not personalized: no consent"
GATE_FILE = "consent.gate"
_COUNTER = struct.Struct("<Q")


class ConsentGate:
    """One consent batch at a time: a thread lock, and with a `path` (several API
    processes) also an exclusive `flock` on that file, whose first 8 bytes count the
    batches that recorded answers, in any process (`generation`)."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            with self._flocked():
                if os.fstat(self._fd).st_size < _COUNTER.size:
                    os.ftruncate(self._fd, _COUNTER.size)
            self._map = mmap.mmap(self._fd, _COUNTER.size)
        self._looked = self.generation()  # what this process's decisions last saw

    def generation(self) -> int:
        return 0 if self._map is None else _COUNTER.unpack_from(self._map)[0]

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock, self._flocked():
            yield

    def recorded(self) -> None:
        """Count a batch that recorded answers (call under `hold`)."""
        if self._map is None:
            return
        before = self.generation()
        _COUNTER.pack_into(self._map, 0, before + 1)
        if self._looked == before:  # our own answers are in our cache already
            self._looked = before + 1

    def others_recorded(self) -> bool:
        """True once per change by another process since the last call."""
        now = self.generation()
        if now == self._looked:
            return False
        self._looked = now
        return True


_GATES: dict[Path | None, ConsentGate] = {}
_GATES_LOCK = threading.Lock()


def consent_gate(settings: Settings) -> ConsentGate:
    """This process's gate for the home (a file lock only with several API processes)."""
    key = settings.run_dir / GATE_FILE if settings.api_workers > 1 else None
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = ConsentGate(key)
        return gate


async def consented(runtime: ServingRuntime, actor: str, timeout_s: float) -> bool:
    cache, consent = runtime.consent, runtime.spec.privacy.consent
    if cache is None or consent is None:
        return True
    if consent_gate(runtime.settings).others_recorded():
        # Another API process recorded answers: start from the store again.
        runtime.consent = cache = ConsentCache(cache.store, ttl_s=cache.ttl_s)
    known = cache.peek(actor, consent)
    if known is not None:
        return known
    try:
        with anyio.move_on_after(timeout_s):
            return await anyio.to_thread.run_sync(
                lambda: cache.allowed(actor, consent), abandon_on_cancel=True
            )
    except Exception:  # a store outage must not personalize by accident
        return False
    return False


def unlogged_actor(decision_id: str) -> str:
    """What a decision without consent is logged and keyed under: not the person (the
    `~nc:` prefix is reserved; `definitions.batch.bandit_log` skips these rows)."""
    return NO_CONSENT_PREFIX + decision_id


def unpersonalized_view(runtime: ServingRuntime, actor: str, policy: Policy) -> UserView:
    """An empty view whose capped actions count as used up."""
    caps = {
        name: action.cap.max
        for name in policy.actions
        if (action := runtime.spec.actions[name]).cap is not None
    }
    return UserView(actor=actor, cap_counts=caps)


def explained(outcome: Outcome) -> Outcome:
    actions = [
        dataclasses.replace(a, reasons=[NOT_PERSONALIZED, *a.reasons]) for a in outcome.actions
    ]
    return dataclasses.replace(outcome, actions=actions)
