"""Prometheus metrics on a per-app registry (two apps in one process never collide).

Request latency is recorded by a small ASGI middleware labelled with the route's path
template, so `/v1/users/{user_id}/features` is one series however many users call it.
The event-to-online lag is observed at decide time from the state row the decision
read (`updated_at_ms - event_ts_ms`: how long the stream took to make the user's newest
event visible), once per state version, so repeated decisions do not over-count it.
"""

import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set by `serving.run` for its worker processes: prometheus_client then keeps values in
files there, and /metrics reports the whole API, not the worker that answered."""
OTHER = "other"
MAX_LABEL_VALUES = 32
"""Distinct values a label may take before the rest collapse into `other`."""
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
M = TypeVar("M", Counter, Histogram)


class Bounded(Generic[M]):
    """A labelled metric whose label values are bounded: `allowed` values per label
    (when given), else the first `cap` distinct values seen; the rest become `other`."""

    def __init__(self, metric: M, *, cap: int = MAX_LABEL_VALUES) -> None:
        self.metric = metric
        self.cap = cap
        self._allowed: dict[int, frozenset[str]] = {}
        self._seen: dict[int, set[str]] = {}

    def allow(self, position: int, values: Iterable[str]) -> None:
        """Only these values (and `other`) for the label at `position`."""
        self._allowed[position] = frozenset(values)

    def labels(self, *values: str) -> M:
        return self.metric.labels(*(self._bound(i, v) for i, v in enumerate(values)))

    def _bound(self, position: int, value: str) -> str:
        allowed = self._allowed.get(position)
        if allowed is not None:
            return value if value in allowed else OTHER
        seen = self._seen.setdefault(position, set())
        if value in seen:
            return value
        if len(seen) >= self.cap:
            return OTHER
        seen.add(value)
        return value


DEGRADED_REASONS = (
    "budget",  # the user's snapshot read overran the policy's latency budget
    "store_error",  # the snapshot read failed (online store down, locked, ...)
    "decide_error",  # deciding on the snapshot failed
    "cached",  # the fallback read of the user's cached decision failed
    "stream",  # the stream is down: features may be stale
    "surface",  # an unknown surface was asked for; the default one served
    "item_model",
    "vector",
    "catalog",
)
"""Label values of `nextbest_decisions_degraded_total` (anything else: `other`)."""
FALLBACK_REASONS = (
    "budget",
    "store_error",
    "decide_error",
    "no_state",  # the online store holds nothing of the user (new or unknown user)
    "stale_state",  # state exists but is too old to count as real time
    "no_consent",  # served without personal data (spec privacy.consent)
    "no_model",
)
"""Label values of `nextbest_decision_fallbacks_total` (anything else: `other`)."""


def degraded_reason(note: str) -> str:
    """The bounded label of a `degraded` note (the notes themselves carry user input,
    e.g. an unknown surface's name, and exception names)."""
    head, _, rest = note.partition(":")
    if head == "realtime":
        if "budget" in rest:
            return "budget"
        return "decide_error" if rest.startswith(" decide ") else "store_error"
    if head.startswith("surface "):
        return "surface"
    return head if head in DEGRADED_REASONS else OTHER


MAX_LAG_S = 3600.0
"""Lags above this are back-dated events, not the stream falling behind."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_latency = Bounded(
            Histogram(
                "nextbest_http_request_duration_seconds",
                "HTTP request latency by route and status.",
                ["method", "route", "status"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.request_latency.allow(0, _METHODS)
        self.events_accepted = Counter(
            "nextbest_events_accepted", "Events accepted and durable in the log.", registry=r
        )
        self.events_rejected = Counter(
            "nextbest_events_rejected", "Events rejected by validation.", registry=r
        )
        self.decisions = Bounded(
            Counter(
                "nextbest_decisions", "Decisions by origin.", ["served_from", "surface"], registry=r
            )
        )
        self.degraded = Bounded(
            Counter(
                "nextbest_decisions_degraded",
                "Decision paths that degraded.",
                ["reason"],
                registry=r,
            )
        )
        self.degraded.allow(0, DEGRADED_REASONS)
        self.fallbacks = Bounded(
            Counter(
                "nextbest_decision_fallbacks",
                "Decisions not served in real time (served_from cached or fallback), by why;"
                " divide by nextbest_decisions_total for the fallback share.",
                ["reason", "served_from"],
                registry=r,
            )
        )
        self.fallbacks.allow(0, FALLBACK_REASONS)
        self.fallbacks.allow(1, ("cached", "fallback"))
        self.decision_log_dropped = Counter(
            "nextbest_decision_log_dropped", "Decision records not logged.", registry=r
        )
        self.feedback = Bounded(
            Counter("nextbest_feedback", "Feedback records.", ["outcome"], registry=r)
        )
        self.online_lag = Histogram(
            "nextbest_event_to_online_lag_seconds",
            "Event time to online-store write time of the state read at decide time.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.model_loaded = Gauge(  # one version at a time: the runtime removes the old
            "nextbest_model_loaded_timestamp_seconds",
            "When the promoted model was loaded.",
            ["version"],
            registry=r,
        )
        self._lag_seen: OrderedDict[str, int] = OrderedDict()

    def allow_surfaces(self, surfaces: Iterable[str]) -> None:
        """The spec's surfaces are the only `surface` label values (the rest: `other`)."""
        self.decisions.allow(1, surfaces)

    def observe_lag(self, user_id: str, event_ts_ms: int, updated_at_ms: int | None) -> None:
        """Event-to-online lag of the state a decision read, once per state write.
        Back-dated events (imports, replays, clients sending old timestamps) are not
        freshness: a lag above `MAX_LAG_S` is left out rather than reported as days."""
        if updated_at_ms is None or self._lag_seen.get(user_id) == updated_at_ms:
            return
        if updated_at_ms - event_ts_ms > MAX_LAG_S * 1000:
            return
        self._lag_seen[user_id] = updated_at_ms
        self._lag_seen.move_to_end(user_id)
        if len(self._lag_seen) > 100_000:
            self._lag_seen.popitem(last=False)
        self.online_lag.observe(max(0, updated_at_ms - event_ts_ms) / 1000)

    def forget(self, user_id: str) -> None:
        self._lag_seen.pop(user_id, None)

    def render(self) -> bytes:
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry)
        # Several API processes (serving.run): every worker's samples, counters summed.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry)


class MetricsMiddleware:
    """Times every routed request; unrouted 404s never reach route middleware."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("path_template") or "unmatched"
            self.metrics.request_latency.labels(scope["method"], route, str(status[0])).observe(
                time.perf_counter() - start
            )
