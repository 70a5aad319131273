"""The API's long-lived state: store clients, the promoted model and item attributes in
memory, trending counts, the decision log, key verification, metrics.

Opened once by the app's lifespan. `reload()` swaps in a new `Assets` object when the
promoted model version changes (one attribute assignment, so a request sees either
the old or the new model, never a mix); `refresh_trending()` replaces the trending
list. Both run in a background loop, off the request path.
"""

import gc
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
from prometheus_client import Gauge

from nextbest.decide.candidates import VectorSearch
from nextbest.decide.decision import Assets
from nextbest.learn.model import ItemModel
from nextbest.learn.uplift import OfferUplift
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from serving.catalog import ItemOverlay
from serving.keys import EPOCH_FILE, KeyVerifier
from serving.metrics import Metrics
from serving.reader import AnswerCache, SnapshotReader
from serving.sinks import DecisionLog, EventSink, open_sink
from serving.stream_health import StreamHealth, StreamProbe
from storage.artifacts import ArtifactStore
from storage.delta.store import DeltaStore
from storage.online.consent import ConsentCache, ConsentStore
from storage.online.items import ItemAttributeStore
from storage.online.models import now_ms
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore
from storage.vectors import VectorStore

log = logging.getLogger(__name__)
ITEMS_TABLE = "items"
TRENDING_LIMIT = 500
UPLIFT_POINTER = "uplift.json"
"""`<home>/models/uplift.json`, written by the Dagster `offer_policy` asset when an
`offer_uplift` candidate passes the OPE gate: `{"version", "artifact_path", ...}`
pointing at the served `OfferUplift` .npz."""


def freeze_heap() -> None:
    """Move everything alive now (modules, the model, the catalog) out of the cyclic
    GC's reach. Without it a full collection walks millions of long-lived objects and
    stalls every request for ~100 ms a few times a minute under load (measured with
    benchmarks/decide.py: p99 ~100-200 ms before, ~10-20 ms after). Frozen objects are
    still freed by reference counting when a reload drops them."""
    gc.collect()
    gc.freeze()


@dataclass
class Health:
    """Why the app is (not) ready, per dependency."""

    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values())


class ServingRuntime:
    def __init__(
        self,
        settings: Settings,
        spec: Spec,
        *,
        online: OnlineStore,
        sink: EventSink,
        vectors: VectorStore | None,
        vectors_error: str | None,
        require_keys: bool,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.online = online
        self.serving = ServingStore(online)
        self.reader = SnapshotReader(self.serving)
        self.answers = AnswerCache()  # cached decisions for reads that overrun the budget
        self.sink = sink
        self.vectors = vectors
        self.vectors_error = vectors_error
        self.metrics = metrics if metrics is not None else Metrics()
        epoch = settings.run_dir / EPOCH_FILE  # revocations drop the cache at once
        self.keys = KeyVerifier(online, epoch=epoch) if require_keys else None
        self.pseudonymization_key = settings.pseudonymization_key.get_secret_value().encode()
        # Consent (spec privacy.consent): ingest writes through; other writers within 1 s.
        self.consent = (
            ConsentCache(ConsentStore(online.engine), ttl_s=1.0)
            if spec.privacy.consent is not None
            else None
        )
        self.assets = Assets()
        self.items = ItemOverlay(ItemAttributeStore(online), spec)  # PUT /v1/items
        self.model_error: str | None = None
        self.uplift: OfferUplift | None = None
        self.uplift_error: str | None = None
        self.trending: list[tuple[str, float]] = []
        self._reload_lock = threading.Lock()
        self.models = ArtifactStore.from_settings(settings)  # <home>/models or a bucket
        self.decision_log = DecisionLog(
            sink,
            count_caps=self.serving.increment_caps,
            on_drop=lambda n: self.metrics.decision_log_dropped.inc(n),
        )
        self.cap_periods = {
            name: int(a.cap.per.seconds * 1000)
            for name, a in spec.actions.items()
            if a.cap is not None
        }
        self.trending_features = {
            c.feature
            for p in spec.policies.values()
            for c in p.candidates
            if c.source == "trending" and c.feature
        }
        # The stream's health, refreshed by a timer (`watch_stream`), read per request.
        self.stream_probe = StreamProbe(settings, online.engine)
        self.stream_health: StreamHealth | None = None
        self.stream_note: str | None = None  # `degraded` note of every decision when down
        self._stream_gauges = _stream_gauges(self.metrics)
        self._stream_stop = threading.Event()
        self._stream_thread: threading.Thread | None = None

    @classmethod
    def open(
        cls, settings: Settings, spec: Spec, *, require_keys: bool, metrics: Metrics | None = None
    ) -> "ServingRuntime":
        """Open every store once; a vector store that cannot be opened is reported by
        /ready and leaves decisions on their in-memory paths."""
        online = OnlineStore.from_settings(settings)
        ServingStore(online).ensure_tables()
        ItemAttributeStore(online).ensure_tables()
        vectors: VectorStore | None = None
        vectors_error: str | None = None
        try:
            vectors = VectorStore.from_settings(
                settings,
                dim=spec.model.dim,
                item_attributes={n: a.type for n, a in spec.entities.item.attributes.items()},
                read_consistency_interval=timedelta(seconds=5),
            )
        except Exception as exc:
            vectors_error = f"{type(exc).__name__}: {exc}"[:200]
        sink = open_sink(settings)
        runtime = cls(
            settings,
            spec,
            online=online,
            sink=sink,
            vectors=vectors,
            vectors_error=vectors_error,
            require_keys=require_keys,
            metrics=metrics,
        )
        runtime.reload()
        runtime.reload_uplift()
        runtime.refresh_trending()
        runtime.watch_stream()
        return runtime

    def close(self) -> None:
        self._stream_stop.set()
        if self._stream_thread is not None:
            self._stream_thread.join(timeout=5)
        self.stream_probe.close()
        self.reader.close()
        self.decision_log.close()
        self.sink.close()
        self.online.dispose()

    # --- background refresh -------------------------------------------------------

    def reload(self, *, force: bool = False) -> bool:
        """Load the promoted model and item attributes if the version changed."""
        with self._reload_lock:
            record = self.online.promoted_model()
            current = self.assets.model.version if self.assets.model is not None else None
            if record is None or (record.version == current and not force):
                if record is None:
                    self.model_error = "no promoted model in the registry"
                    if not self.assets.attributes:
                        self.assets = Assets.build(None, self.load_attributes(), spec=self.spec)
                return False
            try:
                if not record.artifact_path:
                    raise FileNotFoundError("the promoted model has no artifact_path")
                model = self.models.load(record.artifact_path, ItemModel.load)
            except Exception as exc:
                self.model_error = f"model {record.version}: {type(exc).__name__}: {exc}"[:300]
                log.warning("cannot load promoted model: %s", self.model_error)
                return False
            model.version = record.version
            self.assets = Assets.build(model, self.load_attributes(), spec=self.spec)
            freeze_heap()
            self.model_error = None
            self.metrics.model_loaded.clear()
            self.metrics.model_loaded.labels(record.version).set(now_ms() / 1000)
            log.info("loaded model %s (%d items)", record.version, model.n_items)
            return True

    def reload_uplift(self) -> bool:
        """Load the offer uplift models when `models/uplift.json` names a new version.
        Offers are ranked by priority while there is none; a pointer that disappears
        drops the model, an unreadable artifact keeps the previous one."""
        pointer = self.models / UPLIFT_POINTER
        with self._reload_lock:
            try:
                info = json.loads(pointer.read_text())
            except FileNotFoundError:
                changed = self.uplift is not None
                self.uplift = None
                return changed
            except (OSError, ValueError) as exc:
                self.uplift_error = f"{UPLIFT_POINTER}: {type(exc).__name__}"
                return False
            version = str(info.get("version") or "") if isinstance(info, dict) else ""
            current = self.uplift.version if self.uplift is not None else None
            if not version or version == current:
                return False
            try:
                uplift = self.models.load(str(info["artifact_path"]), OfferUplift.load)
            except Exception as exc:
                self.uplift_error = f"uplift {version}: {type(exc).__name__}: {exc}"[:300]
                log.warning("cannot load uplift model: %s", self.uplift_error)
                return False
            self.uplift = OfferUplift(uplift.feature_names, uplift.models, version)
            self.uplift_error = None
            log.info("loaded uplift model %s (offers: %s)", version, ", ".join(uplift.models))
            return True

    def refresh_items(self) -> bool:
        """Apply item attribute updates other processes stored (`serving.catalog`)."""
        with self._reload_lock:
            updated = self.items.apply_new(self.assets, self.spec)
            if updated is not None:
                self.assets = updated
            return updated is not None

    def load_attributes(self) -> dict[str, dict[str, Any]]:
        """The catalog with the updates made over HTTP laid over it (`serving.catalog`)."""
        return self.items.laid_over(self._catalog_attributes())

    def _catalog_attributes(self) -> dict[str, dict[str, Any]]:
        """Item attributes: the Delta catalog when present, else the LanceDB items table."""
        names = list(self.spec.entities.item.attributes)
        try:
            delta = DeltaStore.from_settings(self.settings)
            if delta.exists(ITEMS_TABLE):
                table = delta.read(ITEMS_TABLE)
                cols = ["item_id", *(n for n in names if n in table.column_names)]
                return {r.pop("item_id"): r for r in table.select(cols).to_pylist()}
        except Exception as exc:
            log.warning("cannot read the Delta items table: %s", exc)
        if self.vectors is not None:
            try:
                data = self.vectors.checkout("items", self.vectors.version("items")).to_arrow()
                cols = ["item_id", *(n for n in names if n in data.column_names)]
                return {r.pop("item_id"): r for r in data.select(cols).to_pylist()}
            except Exception as exc:
                log.info("no item attributes in LanceDB: %s", exc)
        return {}

    def refresh_trending(self) -> None:
        if not self.trending_features:
            return
        name = sorted(self.trending_features)[0]
        feature = self.spec.features.get(name)
        window = getattr(feature, "window", None)
        window_ms = int(window.seconds * 1000) if window is not None else None
        self.trending = self.serving.top_entities(name, limit=TRENDING_LIMIT, window_ms=window_ms)

    def refresh_stream(self) -> StreamHealth | None:
        """Read the stream's status once; keeps the last answer when the read fails."""
        try:
            health = self.stream_probe.check()
        except Exception as exc:
            log.warning("cannot read the stream status: %r", exc)
            return self.stream_health
        self.stream_health = health
        self.stream_note = None if health.up else f"stream: {health.detail}"
        dead, lag_events, lag_s, age = self._stream_gauges
        dead.set(health.dead_letters)
        lag_events.set(-1 if health.lag_events is None else health.lag_events)
        lag_s.set(health.lag_s)
        age.set(-1 if health.heartbeat_age_s is None else health.heartbeat_age_s)
        return health

    def watch_stream(self) -> None:
        """Refresh the stream's health now and every `stream_heartbeat_s` in a thread."""
        self.refresh_stream()
        interval = self.settings.stream_heartbeat_s

        def run() -> None:
            while not self._stream_stop.wait(interval):
                self.refresh_stream()

        self._stream_thread = threading.Thread(target=run, name="stream-health", daemon=True)
        self._stream_thread.start()

    # --- readiness ------------------------------------------------------------------

    def health(self) -> Health:
        checks: dict[str, str] = {}
        checks["online_store"] = "ok" if self.online.ping() else "unreachable"
        problem = getattr(self.sink, "problem", None)  # the embedded log says why
        reason = problem() if problem is not None else None
        checks["event_log"] = reason or ("ok" if self.sink.ping() else "unreachable")
        if self.vectors is None:
            checks["vector_store"] = f"unavailable: {self.vectors_error}"
        else:
            try:
                self.vectors.count("items")
                checks["vector_store"] = "ok"
            except LookupError:  # reachable; Dagster has not written the items table yet
                checks["vector_store"] = "ok"
            except Exception as exc:
                checks["vector_store"] = f"unavailable: {type(exc).__name__}"
        checks["model"] = "ok" if self.assets.model is not None else (self.model_error or "none")
        stream = self.stream_health
        checks["stream"] = "ok" if stream is None else stream.detail
        return Health(checks)

    def vector_search(self) -> VectorSearch | None:
        """LanceDB search for when no model is loaded (vectors live only there)."""
        vectors = self.vectors
        if vectors is None or self.assets.model is not None:
            return None

        def search(vector: np.ndarray, k: int) -> list[tuple[str, float]]:
            return [(r["item_id"], float(r["score"])) for r in vectors.search_items(vector, k=k)]

        return search


def _stream_gauges(metrics: Metrics) -> tuple[Gauge, Gauge, Gauge, Gauge]:
    """The stream's health as Prometheus gauges on the app's registry (reused when an
    app's lifespan opens a second runtime on the same registry)."""
    r = metrics.registry
    specs = (
        ("nextbest_stream_dead_letters_total", "Records the stream dead-lettered, in total."),
        ("nextbest_stream_lag_events", "Events the stream has not read yet (-1: unknown)."),
        ("nextbest_stream_lag_seconds", "How long pending events waited without progress."),
        ("nextbest_stream_heartbeat_age_seconds", "Age of the stream's heartbeat (-1: none)."),
    )
    gauges: list[Gauge] = []
    for name, doc in specs:
        existing = r._names_to_collectors.get(name)  # no public lookup
        gauges.append(existing if isinstance(existing, Gauge) else Gauge(name, doc, registry=r))
    return gauges[0], gauges[1], gauges[2], gauges[3]
