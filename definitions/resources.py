"""The one Dagster resource: where the data home is and how retraining behaves.

Fields left unset fall back to `Settings()` (the `NEXTBEST_*` environment, read when a
run starts, never at import), so `dagster dev` with `NEXTBEST_HOME` set
needs no configuration, while tests and the CLI pass explicit values.
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from storage.artifacts import ArtifactStore
from storage.delta.store import DeltaStore
from storage.online.store import OnlineStore
from storage.vectors import AttrType, VectorStore

OpeGate = Literal["off", "not_worse", "better"]
"""Which off-policy verdicts let a new offer policy be served (see `offer_policy`)."""


@functools.lru_cache(maxsize=8)
def _spec_at(path: str, mtime_ns: int) -> Spec:
    return load_spec(path)


def cached_spec(path: Path) -> Spec:
    """Parse the spec once per file version (assets of one run share it)."""
    resolved = path.expanduser().resolve()
    return _spec_at(str(resolved), resolved.stat().st_mtime_ns)


class NextbestResource(dg.ConfigurableResource):
    """Stores of the nextbest data home plus the retraining knobs shown in the UI."""

    home: str | None = Field(default=None, description="Data home; NEXTBEST_HOME if unset.")
    spec: str | None = Field(default=None, description="Spec file; NEXTBEST_SPEC if unset.")
    online_url: str | None = Field(default=None, description="Online store URL override.")
    delta_uri: str | None = Field(default=None, description="Delta root override.")
    lance_uri: str | None = Field(default=None, description="LanceDB URI override.")
    # Object-store credentials (NEXTBEST_STORAGE_OPTIONS) come from the environment only,
    # never resource config, which the Dagster UI displays.
    models_uri: str | None = Field(default=None, description="Model artifacts root override.")
    retention_hours: int = Field(
        default=168, description="Delta vacuum / LanceDB cleanup retention (hours)."
    )
    promotion_tolerance: float = Field(
        default=0.005,
        description="Promote a new model unless its nDCG@10 is lower than the promoted "
        "one's by more than this (negative: require an improvement).",
    )
    min_ndcg: float = Field(default=0.0, description="Metric floor checked on evaluation.")
    ope_gate: OpeGate = Field(
        default="better",
        description="Serve a new offer (uplift) policy only if off-policy evaluation finds "
        "it better than the current one (DR interval above it), or at least not worse "
        "(`not_worse`); `off` serves every trained candidate.",
    )
    ope_min_coverage: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of held-out offer decisions a candidate offer policy must be "
        "evaluated on; below it the verdict is `not estimated` and only gate `off` serves it.",
    )
    freshness_hours: float = Field(
        default=48.0, description="Bronze is stale when nothing was ingested for this long."
    )
    cached_k: int = Field(default=20, description="Actions cached per active user.")
    active_days: int = Field(
        default=30, description="Users with an event this recent get cached decisions."
    )
    replay_max_events: int = Field(default=2000, description="Events scored by the replay.")
    seed: int = Field(default=0, description="Seed of the evaluation split and sampling.")

    def settings(self) -> Settings:
        overrides = {
            "home": self.home,
            "spec": self.spec,
            "online_url": self.online_url,
            "delta_uri": self.delta_uri,
            "lance_uri": self.lance_uri,
            "models_uri": self.models_uri,
        }
        return Settings(**{k: v for k, v in overrides.items() if v})  # type: ignore[arg-type]

    def load_spec(self) -> Spec:
        return cached_spec(self.settings().spec)

    def delta(self) -> DeltaStore:
        return DeltaStore.from_settings(self.settings())

    @contextmanager
    def online(self) -> Iterator[OnlineStore]:
        store = OnlineStore.from_settings(self.settings())
        try:
            yield store
        finally:
            store.dispose()

    def vectors(self, spec: Spec) -> VectorStore:
        attrs: dict[str, AttrType] = {n: a.type for n, a in spec.entities.item.attributes.items()}
        store = VectorStore.from_settings(
            self.settings(), dim=spec.model.dim, item_attributes=attrs
        )
        store.ensure_tables()
        return store

    def models_dir(self) -> ArtifactStore:
        """The models root: `<home>/models`, or beside an object-store Delta root."""
        return ArtifactStore.from_settings(self.settings())


def resource_for(settings: Settings | None, **options: object) -> NextbestResource:
    """The resource for explicit settings (tests, CLI) or the environment (UI)."""
    if settings is None:
        return NextbestResource(**options)  # type: ignore[arg-type]
    return NextbestResource(
        home=str(settings.home_dir),
        spec=str(Path(settings.spec).expanduser().resolve()),
        online_url=settings.online_url,
        delta_uri=settings.delta_uri,
        lance_uri=settings.lance_uri,
        models_uri=settings.models_uri,
        **options,  # type: ignore[arg-type]
    )
