"""The proof behind an erasure job's `done`, repeated DELETEs, and the online store's
free space on PostgreSQL. Real event log, online stores and `ServingRuntime`; the
stream's reports are written as the stream would write them (as in
tests/serving/test_erasure_resume.py)."""

import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.erasure import STREAM_STORES, resume_erasures, start_erasure
from serving.runtime import ServingRuntime
from storage.erasure_scan import Needles, scan_tree
from storage.online.engine import create_online_engine
from storage.online.models import FeatureRow
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore

USER = "scan-canary-user"


def _never(_fn: Callable[[], None]) -> None:
    """The background part of the job does not run yet."""


def _inline(fn: Callable[[], None]) -> None:
    fn()


def test_a_job_is_done_only_when_no_file_under_the_home_holds_the_id(settings: Settings) -> None:
    """Every store reports done, but a file under the data home still names the user:
    the job is `failed` and says where. Once the file is gone, a DELETE is done."""
    spec = load_spec(settings.spec)
    runtime = ServingRuntime.open(settings, spec, require_keys=False)
    try:
        stray = settings.home_dir / "exports" / "report.csv"
        stray.parent.mkdir(parents=True)
        stray.write_text(f"user,score\n{USER},1\nsomeone-else,2\n")
        job = start_erasure(runtime, USER, spawn=_never)
        runtime.serving.update_erasure_stores(job.job_id, dict.fromkeys(STREAM_STORES, "done"))
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=5.0) == 1
        failed = runtime.serving.erasure_job(job.job_id)
        assert failed is not None and failed.status == "failed", failed
        assert failed.stores["scan"] == "failed: still found in exports/report.csv"
        assert failed.stores["eventlog"] == "done"

        stray.unlink()
        again = start_erasure(runtime, USER, spawn=_never)
        runtime.serving.update_erasure_stores(again.job_id, dict.fromkeys(STREAM_STORES, "done"))
        assert resume_erasures(runtime, spawn=_inline, stream_wait_s=5.0) == 1
        done = runtime.serving.erasure_job(again.job_id)
        assert done is not None and done.status == "done", done
        assert done.stores["scan"].startswith("done: none of")
    finally:
        runtime.close()


def test_a_repeated_delete_joins_the_running_job(settings: Settings) -> None:
    """A loop of DELETEs for one person starts one job (one erase request, one pass)."""
    spec = load_spec(settings.spec)
    runtime = ServingRuntime.open(settings, spec, require_keys=False)
    try:
        first = start_erasure(runtime, USER, spawn=_never)
        for _ in range(20):
            assert start_erasure(runtime, USER, spawn=_never).job_id == first.job_id
        assert len(runtime.serving.unfinished_erasure_jobs()) == 1
    finally:
        runtime.close()


def test_ids_are_matched_whole_not_inside_longer_ids(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b'{"user_id": "u10", "event_id": "web-u100-1"}')
    (tmp_path / "b").write_bytes(b'{"event_id": "web-u1-7"}')
    (tmp_path / "c").write_bytes(b"x" * (1 << 20) + b"anon:u1")  # across a chunk boundary
    assert scan_tree(tmp_path, Needles(["u1"])) == ["b", "c"]


def test_postgres_tables_are_vacuumed_after_an_erasure(pg_url: str) -> None:
    """The deleted rows' tuples are reclaimed (VACUUM), not left dead in the heap."""
    base = create_online_engine(pg_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with base.begin() as conn:
        conn.execute(sa.text(f'create schema "{schema}"'))
    store = OnlineStore(base.execution_options(schema_translate_map={None: schema}))
    try:
        store.create_all()
        rows = [FeatureRow(USER, f"f{i}", 1.0, 1, "") for i in range(50)]
        store.upsert_features(rows)
        serving = ServingStore(store)
        serving.ensure_tables()
        serving.erase_user(USER)
        assert serving.scrub()
        with base.connect() as conn:
            stats = conn.execute(
                sa.text(
                    "select n_dead_tup, last_vacuum from pg_stat_user_tables "
                    "where schemaname = :s and relname = 'nb_user_features'"
                ),
                {"s": schema},
            ).one()
        assert stats.last_vacuum is not None
        assert stats.n_dead_tup == 0
    finally:
        with base.begin() as conn:
            conn.execute(sa.text(f'drop schema "{schema}" cascade'))
        base.dispose()
