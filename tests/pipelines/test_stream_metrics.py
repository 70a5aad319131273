"""The stream worker's Prometheus endpoint, through a real stream process (`python -m
pipelines`): its address is recorded in the home, counters move when events arrive,
lag returns to zero once applied, and `nextbest status` reports the live figures."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from launcher.admin import status_info
from launcher.live import Sample, quantile, scrape, total
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.metrics import StreamMetrics, stream_endpoints
from storage.bootstrap import init_stores
from storage.eventlog.log import EventLog
from tests.e2e.test_stack import free_port
from tests.support.common import ROOT
from tests.support.stream_helpers import append_log, demo_events, start_stream, write_catalog
from tests.support.waiting import wait_until

Check = Callable[[list[Sample]], bool]


def _views(n: int, user: str) -> list[dict[str, object]]:
    now = time.time()
    return [
        {"type": "view", "user_id": user, "item_id": f"i{i % 20:05d}", "ts": now} for i in range(n)
    ]


@pytest.mark.slow
def test_stream_metrics_move_with_events_and_status_reads_them(settings: Settings) -> None:
    spec = load_spec(settings.spec)
    list(init_stores(settings, spec))
    cfg, _ = demo_events(10)
    write_catalog(settings, spec, cfg, vectors=False)
    assert append_log(settings, _views(30, "metrics-u1")) == 30
    with EventLog.from_settings(settings, mode="writer") as log:
        log.append([("bad", b"{not json")])  # a dead letter
    proc = start_stream(settings)
    stream_log = settings.home_dir / "logs" / "stream.log"

    def alive() -> None:
        assert proc.poll() is None, stream_log.read_text(errors="replace")[-1500:]

    def endpoint() -> str | None:
        alive()
        found = stream_endpoints(settings)
        return str(found[0]["url"]) if found else None

    try:
        url = wait_until(endpoint, timeout=60, what="the stream's metrics address", every=0.2)
        assert url.startswith("http://127.0.0.1:")

        def scraped(check: Check) -> list[Sample] | None:
            alive()
            samples = scrape(url)
            return samples if samples is not None and check(samples) else None

        def caught_up(events: int) -> Check:
            def check(s: list[Sample]) -> bool:
                return (
                    total(s, "nextbest_stream_events_total", type="view") == events
                    and total(s, "nextbest_stream_applied_offset") == events + 1
                    and total(s, "nextbest_stream_lag_records") == 0
                    and total(s, "nextbest_stream_last_event_timestamp_seconds") > 0
                )

            return check

        first = wait_until(lambda: scraped(caught_up(30)), timeout=60, what="30 views counted")
        assert total(first, "nextbest_stream_dead_letters_written_total") == 1
        assert total(first, "nextbest_stream_records_total", kind="dead") == 1
        assert total(first, "nextbest_stream_end_offset") == 31
        assert total(first, "nextbest_stream_state_keys", state="user") >= 1
        assert total(first, "nextbest_stream_event_to_online_seconds_count") >= 1
        epochs = wait_until(
            lambda: scraped(lambda s: total(s, "nextbest_stream_epoch_duration_seconds_count") > 2),
            timeout=30,
            what="epochs timed",
        )
        assert 0 < quantile(epochs, "nextbest_stream_epoch_duration_seconds", 0.5) < 60  # type: ignore[operator]

        # More events: the counters move, the new user's state is counted.
        append_log(settings, _views(12, "metrics-u2"))
        second = wait_until(lambda: scraped(caught_up(42)), timeout=60, what="12 more views")
        assert total(second, "nextbest_stream_state_keys", state="user") >= 2
        assert total(second, "nextbest_stream_events_per_second") > 0

        info = status_info(settings, spec)
        assert info["stream_metrics"] == url
        assert info["stream_events_in"] == 42 and info["stream_lag_live"] == 0
        assert info["stream_dead_letters_in"] == 1
        assert info["stream_freshness"].endswith(" ms")
        assert info["stream_epoch"].startswith("mean ")
        json.dumps(info)  # `status --json` prints it

        # The stream's own log lines are JSON with the stream component.
        lines = [json.loads(x) for x in stream_log.read_text().splitlines() if x.startswith("{")]
        started = [x for x in lines if x["event"].startswith("stream metrics on")]
        assert started and started[0]["component"] == "stream" and started[0]["level"] == "info"
        assert started[0]["timestamp"].endswith("Z")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert stream_endpoints(settings) == []  # the address file went with the process


def test_events_per_second_is_zero_when_idle_and_counts_recent_batches() -> None:
    metrics = StreamMetrics()
    assert metrics.rate() == 0.0

    class Rec:
        kind = "event"

        class body:
            type = "view"

    metrics.count([Rec()] * 5)
    start = time.monotonic()
    assert metrics.rate(start + 0.1) == 0.0  # too short a span to say
    assert metrics.rate(start + 5) == pytest.approx(1.0, rel=0.01)  # 5 events over 5 s
    assert metrics.rate(start + 30) == pytest.approx(5 / 30, rel=0.01)


def test_status_quantiles_interpolate_inside_the_bucket_like_prometheus() -> None:
    buckets = [("0.1", 1.0), ("0.5", 3.0), ("+Inf", 4.0)]
    samples: list[Sample] = [("h_bucket", {"le": le, "route": "/a"}, v) for le, v in buckets]
    samples.append(("h_bucket", {"le": "+Inf", "route": "/b"}, 100.0))  # another route
    assert quantile(samples, "h", 0.5, route="/a") == pytest.approx(0.3)
    assert quantile(samples, "h", 0.25, route="/a") == pytest.approx(0.1)
    assert quantile(samples, "h", 0.99, route="/a") == pytest.approx(0.5)  # in +Inf: the last bound
    assert quantile(samples, "h", 0.5, route="/none") is None


@pytest.mark.slow
def test_each_process_of_a_cluster_serves_its_own_metrics(settings: Settings) -> None:
    spec = load_spec(settings.spec)
    list(init_stores(settings, spec))
    cfg, _ = demo_events(10)
    write_catalog(settings, spec, cfg, vectors=False)
    events = [v for u in range(8) for v in _views(5, f"cluster-u{u}")]
    append_log(settings, events)
    # Bytewax 0.21 clusters sometimes panic at startup (tests/e2e/test_pipeline_process.py):
    # a restart resumes from the recovery store, as a supervisor's would.
    for attempt in range(3):
        if _cluster_attempt(settings, len(events), attempt, last=attempt == 2) is not None:
            break
    else:
        raise AssertionError("the cluster never started")


class _Died(Exception):
    pass


def _cluster_attempt(settings: Settings, n: int, attempt: int, *, last: bool) -> list[str] | None:
    """Run a two-process cluster until it counted `n` views; None after a startup panic."""
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    args = [a for address in addresses for a in ("-a", address)]
    paths = [logs / f"p{i}-{attempt}.log" for i in range(2)]
    procs = [_cluster_worker(settings, i, args, paths[i]) for i in range(2)]

    def both() -> list[dict[str, object]] | None:
        if any(p.poll() is not None for p in procs):
            raise _Died
        found = stream_endpoints(settings)
        return found if len(found) == 2 else None

    def counted(urls: list[str]) -> bool:
        if any(p.poll() is not None for p in procs):
            raise _Died
        samples = [s for url in urls for s in scrape(url) or []]
        lag = [v for name, _, v in samples if name == "nextbest_stream_lag_records"]
        views = total(samples, "nextbest_stream_events_total", type="view")
        return views == n and bool(lag) and max(lag) == 0

    try:
        try:
            found = wait_until(both, timeout=90, what="two metrics endpoints", every=0.2)
            urls = sorted(str(f["url"]) for f in found)
            assert len(set(urls)) == 2 and {f["process_id"] for f in found} == {0, 1}
            wait_until(lambda: counted(urls), timeout=90, what="every view counted once")
        except _Died:
            text = "".join(path.read_text(errors="replace") for path in paths)
            if "Send thread panic" in text and not last:
                return None
            raise AssertionError(text[-3000:]) from None
        info = status_info(settings, load_spec(settings.spec))
        assert info["stream_events_in"] == n and info["stream_lag_live"] == 0
        assert sorted(info["stream_metrics"].split(", ")) == urls
        return urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def _cluster_worker(
    settings: Settings, index: int, args: list[str], log: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "pipelines", "--home", str(settings.home_dir)]
    argv += ["--spec", str(settings.spec), "--epoch-ms", "300", "-i", str(index), *args]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)
