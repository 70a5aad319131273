"""Crash harness: replay demo events through the API while SIGKILLing the stream worker
and the API, then check that nothing acknowledged was lost or duplicated.

    .venv/bin/python -m benchmarks.chaos [--events 100000] [--stream-kills 10]
        [--api-kills 3] [--seed 7] [--no-idempotency]

The API (`nextbest api`, keys on) and the stream (`nextbest stream`) run as real
processes on a temporary data home and a free port. A client thread posts batches to
`POST /v1/events` and records every event id that got a 202; a batch that failed
because the API was down is retried until it gets one. A chaos thread kills the stream
and the API at random moments (drawn from the client's progress plus a random delay)
and restarts each at once. Afterwards the stream drains the log, then
`python -m pipelines --stop-at-end` resumes from its recovery store and exits at the
log's end, and the check runs: every acknowledged id in Delta bronze exactly once,
and every online window feature equal to a batch recomputation from bronze.

`--no-idempotency` then appends a replayed copy of some committed rows under a fresh
app id (a sink without the transaction-version guard) and re-runs the check, which
must report exactly those duplicates.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.chaos_check import (
    BronzeProgress,
    ChaosConfig,
    ChaosResult,
    Kill,
    Target,
    check_bronze,
    inject_replay_duplicates,
)
from benchmarks.chaos_procs import Component, free_port, wait_for
from nextbest.demo.shop import DemoConfig, iter_event_dicts
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.eventlog.log import EventLog
from tests.support.stream_helpers import delta_events, online_mismatches, write_catalog

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "nextbest.yaml"
TRICKLE, TRICKLE_EVERY_S = 10, 0.25
RESTART_ATTEMPTS = 5
# Sent but not answered: the API may have made the batch durable before dying.
AMBIGUOUS = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteError)


def offered_rate(config: ChaosConfig) -> float:
    """Pace the replay to last about as long as the kills and restarts take (~4 s per
    stream restart, ~5 s per API restart), so kills spread over the whole replay."""
    if config.rate:
        return config.rate
    return config.events / (4.0 * config.stream_kills + 5.0 * config.api_kills + 5.0)


def demo_config(n_events: int, seed: int) -> DemoConfig:
    """Fixed shape per size: ~25 events per user, ~20 per item."""
    return DemoConfig.small(
        n_events=n_events,
        n_users=max(200, n_events // 25),
        n_items=max(300, min(5000, n_events // 20)),
        seed=seed,
    )


class Harness:
    def __init__(self, home: Path, config: ChaosConfig, *, echo: Callable[[str], Any]) -> None:
        self.config = config
        self.echo = echo
        self.settings = Settings(home=home / "data", spec=SPEC, _env_file=None)  # type: ignore[call-arg]
        self.spec = load_spec(SPEC)
        self.port = free_port()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))
        }
        self.env |= {"PYTHONPATH": str(ROOT), "NEXTBEST_API_PORT": str(self.port)}
        home_args = ["--home", str(self.settings.home_dir), "--spec", str(SPEC)]
        cli = [sys.executable, "-m", "launcher", *home_args]
        self.cli = cli

        def component(name: str, argv: list[str]) -> Component:
            return Component(name, argv, env=self.env, cwd=ROOT, log=home / f"{name}.log")

        self.api = component("api", [*cli, "api"])
        self.stream = component("stream", [*cli, "stream"])
        bounded = [sys.executable, "-m", "pipelines", *home_args, "--stop-at-end"]
        self.final = component("final", bounded)
        self.url = f"http://127.0.0.1:{self.port}"
        self.progress = BronzeProgress(self.settings, self.settings.partitions)
        self.result = ChaosResult(config)
        self.client_done = threading.Event()
        self.chaos_done = threading.Event()
        self.client_error: BaseException | None = None

    # -- set-up ----------------------------------------------------------------

    def setup(self) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        cfg = demo_config(self.config.events, self.config.seed)
        self.settings.home_dir.mkdir(parents=True, exist_ok=True)
        items = write_catalog(self.settings, self.spec, cfg, vectors=True)
        events = list(iter_event_dicts(cfg))
        out = subprocess.run(
            [*self.cli, "keys", "create", "--scope", "ingest,decide,admin"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        self.key = out.stdout.strip().splitlines()[-1]
        return events, items

    def api_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _bronze_total(self) -> int:
        return sum(self.progress.offsets().values())

    def caught_up(self) -> bool:
        with EventLog.from_settings(self.settings, mode="reader") as log:
            ends = log.end_offsets()
        done = self.progress.offsets()
        return all(done[p] >= end - 1 for p, end in ends.items())

    # -- the client --------------------------------------------------------------

    def client(self, events: list[dict[str, Any]]) -> None:
        """Full speed up to the last tenth, which trickles in small batches until the
        chaos is over: every kill then lands while events are still arriving, and a
        restarted stream always has new events to show its progress on."""
        size, r = self.config.batch_size, self.result
        held = len(events) * 9 // 10
        rate = offered_rate(self.config)
        t0 = time.monotonic()
        try:
            with httpx.Client(
                base_url=self.url, headers={"X-API-Key": self.key}, timeout=60
            ) as http:
                start = 0
                while start < len(events):
                    trickle = start >= held and not self.chaos_done.is_set()
                    delay = t0 + start / rate - time.monotonic()
                    if delay > 0 and not trickle:
                        time.sleep(delay)
                    batch = events[start : start + (TRICKLE if trickle else size)]
                    self._post(http, batch)
                    start += len(batch)
                    r.replayed = start
                    if trickle:
                        self.chaos_done.wait(TRICKLE_EVERY_S)
        except BaseException as exc:  # surfaced by run()
            self.client_error = exc
        finally:
            self.client_done.set()

    def _post(self, http: httpx.Client, batch: list[dict[str, Any]]) -> None:
        """Until a 202: a refused connection or a 503 means not appended, retry; a request
        sent but unanswered may have been appended, and is retried too (at-least-once)."""
        deadline = time.monotonic() + 180
        attempts = 0
        while True:
            attempts += 1
            if attempts == 2:
                self.result.retried_batches += 1
            if time.monotonic() > deadline:
                raise TimeoutError("a batch got no 202 for 180 s")
            try:
                response = http.post("/v1/events", json={"events": batch})
            except AMBIGUOUS:
                self.result.ambiguous_ids.update(e["event_id"] for e in batch)
                time.sleep(0.05)
                continue
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if response.status_code == 202:
                body = response.json()
                self.result.acknowledged.update(body["event_ids"])
                if body["rejected"]:
                    raise AssertionError(f"demo events rejected: {body['rejected'][:3]}")
                return
            if response.status_code >= 500:
                time.sleep(0.05)
                continue
            raise AssertionError(f"POST /v1/events: {response.status_code} {response.text[:300]}")

    # -- the chaos ---------------------------------------------------------------

    def schedule(self) -> list[tuple[float, Target]]:
        rng = random.Random(self.config.seed)
        plan: list[tuple[float, Target]] = []
        for _ in range(self.config.stream_kills):
            plan.append((rng.uniform(0.03, 0.85), "stream"))
        for _ in range(self.config.api_kills):
            plan.append((rng.uniform(0.05, 0.85), "api"))
        return sorted(plan)

    def chaos(self, t0: float) -> None:
        rng = random.Random(self.config.seed + 1)
        n = self.config.events
        # The first stream kill hits a worker that has committed something.
        wait_for(lambda: self._bronze_total() > -self.settings.partitions, 120, "first commit")
        for fraction, target in self.schedule():
            wait_for(
                lambda f=fraction: self.result.replayed >= f * n or self.client_done.is_set(),
                self.config.timeout_s,
                "client progress",
            )
            time.sleep(rng.uniform(0.0, 0.4))
            component = self.stream if target == "stream" else self.api
            if not component.alive():
                raise RuntimeError(f"{target} died on its own:\n{component.tail()}")
            component.kill()
            at = time.monotonic() - t0
            live = not self.client_done.is_set()
            before = self._bronze_total()
            restarted = time.monotonic()
            self._restart(component, target, before)
            recover = time.monotonic() - restarted
            self.result.kills.append(Kill(target, at, recover, live))
            self.echo(
                f"  killed {target:6} at {at:6.1f} s ({self.result.replayed} events sent), "
                f"recovered in {recover:.2f} s"
            )
        self.chaos_done.set()

    def _restart(self, component: Component, target: Target, before: int) -> None:
        """Start again and wait until it recovers. Like a supervisor, start again if it
        exits on start-up (e.g. a module mid-edit in a shared working tree)."""
        if target == "api":
            ready = lambda: self.api_up() or not self.api.alive()  # noqa: E731
        else:
            ready = lambda: (  # noqa: E731
                not self.stream.alive()
                or self._bronze_total() > before
                or (self.client_done.is_set() and self.caught_up())
            )
        for attempt in range(RESTART_ATTEMPTS):
            component.start()
            wait_for(ready, 180, f"{target} to recover", every=0.02)
            if component.alive():
                return
            self.result.failed_restarts += 1
            self.echo(f"  {target} exited on start-up (attempt {attempt + 1}); starting again")
            time.sleep(1.0)
        raise RuntimeError(f"{target} did not restart:\n{component.tail()}")

    # -- the run -----------------------------------------------------------------

    def run(self) -> ChaosResult:
        r = self.result
        t_total = time.monotonic()
        events, items = self.setup()
        self.echo(f"data home {self.settings.home_dir}: {len(events)} demo events")
        try:
            self.api.start()
            self.stream.start()
            wait_for(lambda: self.api_up() or not self.api.alive(), 120, "the API")
            if not self.api.alive():
                raise RuntimeError(f"the API did not start:\n{self.api.tail()}")
            t0 = time.monotonic()
            client = threading.Thread(target=self.client, args=(events,), daemon=True)
            client.start()
            try:
                self.chaos(t0)
            finally:
                self.chaos_done.set()
            client.join(self.config.timeout_s)
            if self.client_error is not None:
                raise self.client_error
            r.replay_s = time.monotonic() - t0
            self.api.stop()
            t1 = time.monotonic()
            wait_for(
                lambda: self.caught_up() or not self.stream.alive(),
                self.config.timeout_s,
                "the stream to drain the log",
                every=0.2,
            )
            self.stream.kill()  # tailing never exits; the bounded run below finishes it
            self.final.start()
            assert self.final.proc is not None
            if self.final.proc.wait(timeout=self.config.timeout_s) != 0:
                raise RuntimeError(f"--stop-at-end failed:\n{self.final.tail()}")
            r.drain_s = time.monotonic() - t1
        finally:
            for c in (self.api, self.stream, self.final):
                if c.alive():
                    c.kill()
        stored, table = delta_events(self.settings)
        r.check = check_bronze(r.acknowledged, table.column("event_id").to_pylist())
        r.mismatches = online_mismatches(self.settings, self.spec, stored, items)
        if self.config.no_idempotency:
            r.injected = inject_replay_duplicates(
                self.settings, rows=self.config.injected_rows, seed=self.config.seed
            )
            _, table = delta_events(self.settings)
            r.injected_check = check_bronze(r.acknowledged, table.column("event_id").to_pylist())
        r.total_s = time.monotonic() - t_total
        return r


def run_chaos(
    home: Path, config: ChaosConfig, *, echo: Callable[[str], Any] = lambda _: None
) -> ChaosResult:
    """Run the whole scenario in `home` (a fresh directory) and return the figures."""
    return Harness(home, config, echo=echo).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--stream-kills", type=int, default=10)
    parser.add_argument("--api-kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rate", type=float, default=None, help="offered events/s")
    parser.add_argument(
        "--no-idempotency",
        action="store_true",
        help="after the run, replay committed rows without the guard; the check must fail",
    )
    parser.add_argument("--home", help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        events=args.events,
        stream_kills=args.stream_kills,
        api_kills=args.api_kills,
        seed=args.seed,
        batch_size=args.batch_size,
        rate=args.rate,
        no_idempotency=args.no_idempotency,
    )
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="nb-chaos-"))
    result = run_chaos(home, config, echo=print)
    for line in result.lines():
        print(line)
    assert result.check is not None
    clean = result.check.ok and not result.mismatches
    if config.no_idempotency:
        assert result.injected_check is not None
        return 0 if set(result.injected_check.duplicates) == set(result.injected) else 1
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
