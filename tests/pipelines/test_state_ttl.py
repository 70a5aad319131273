"""`state: {ttl: ...}` means forgotten after the ttl, online too (issue 12): when an idle
actor's stream state expires, the real stream (`run_stream`: Bytewax, the online store,
LanceDB) also deletes the actor's online features and state and its session vector;
a recent actor keeps everything."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from pipelines.run import run_stream
from storage.online.store import OnlineStore
from storage.vectors import VectorStore
from tests.support.stream_helpers import append_log, demo_events, write_catalog

ROOT = Path(__file__).resolve().parents[2]


def _view(n: int, user: str, item: str, ts: datetime) -> dict[str, Any]:
    return {"event_id": f"e-{n}", "type": "view", "user_id": user, "item_id": item,
            "ts": ts.isoformat(), "context": {"session_id": f"s-{user}"}}  # fmt: skip


def _online(settings: Settings, actor: str) -> tuple[int, bool]:
    """(feature rows, whether a state row exists) of an actor in the online store."""
    store = OnlineStore.from_settings(settings)
    try:
        return len(store.get_features(actor)), store.get_state(actor) is not None
    finally:
        store.dispose()


def _vector(settings: Settings, spec: Spec, actor: str) -> bool:
    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    store = VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]
    return store.get_user(actor) is not None


def test_an_expired_actor_is_forgotten_online_and_in_lancedb(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text((ROOT / "nextbest.yaml").read_text() + "\nstate:\n  ttl: 1d\n")
    settings = Settings(home=tmp_path / "home", spec=spec_path, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(spec_path)
    cfg, _ = demo_events(10)
    items = write_catalog(settings, spec, cfg, vectors=True)
    item = sorted(items)[0]
    now = datetime.now(UTC)
    # Older than the ttl (never shorter than the longest window, 30d): due at once.
    old = [_view(n, "u-old", item, now - timedelta(days=40, seconds=-n)) for n in range(3)]
    append_log(settings, [*old, _view(9, "u-new", item, now - timedelta(minutes=5))])
    run_stream(settings, spec, tail=False, epoch_interval=timedelta(milliseconds=100))
    append_log(settings, [_view(10, "u-later", item, now)])  # a later run wakes due keys
    run_stream(settings, spec, tail=False, epoch_interval=timedelta(milliseconds=100))

    assert _online(settings, "u-old") == (0, False)
    assert not _vector(settings, spec, "u-old")
    for kept in ("u-new", "u-later"):
        features, state = _online(settings, kept)
        assert features > 0 and state, kept
        assert _vector(settings, spec, kept), kept
