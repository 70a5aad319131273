"""The `nextbest` command line.

Each command builds `Settings` once and imports its component lazily, so `nextbest
validate` stays fast and the apps never import each other.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextbest.settings import Settings

if TYPE_CHECKING:
    from nextbest.spec import Spec

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "spec", None):
        overrides["spec"] = Path(args.spec)
    if getattr(args, "home", None):
        overrides["home"] = Path(args.home)
    return Settings(**overrides)  # type: ignore[arg-type]


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.spec_loader import SpecError, load_spec

    try:
        spec = load_spec(settings.spec)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        print(f"{settings.spec}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return EXIT_INVALID
    print(
        f"{settings.spec}: ok ({len(spec.events)} event types, {len(spec.features)} features, "
        f"{len(spec.actions)} actions, {len(spec.policies)} policies)"
    )
    return EXIT_OK


def _spec(settings: Settings) -> "Spec":
    """Load the spec or exit 2 with every problem (commands need a valid spec)."""
    from nextbest.spec_loader import SpecError, load_spec

    try:
        return load_spec(settings.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Create the data home and every store, idempotently."""
    from storage.bootstrap import init_stores

    for line in init_stores(settings, _spec(settings)):
        print(line)
    return EXIT_OK


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from serving.run import run_api

    _spec(settings)
    run_api(settings)
    return EXIT_OK


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from pipelines.run import run_stream

    addresses = args.addresses or None
    run_stream(
        settings,
        _spec(settings),
        process_id=args.process_id,
        addresses=addresses,
        workers_per_process=args.workers,
    )
    return EXIT_OK


def cmd_dagster(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.supervisor import dagster_commands, run_foreground

    _spec(settings)
    return run_foreground(settings, dagster_commands(settings))


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.supervisor import up

    return up(settings, _spec(settings), simulate=args.simulate, rate=args.rate)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from definitions import importer

    spec = _spec(settings)
    path = Path(args.path)
    if args.kind == "movielens":
        summaries = list(importer.import_movielens(settings, spec, path).values())
    elif args.kind == "items":
        summaries = [importer.import_items(settings, spec, path)]
    else:
        summaries = [importer.import_events(settings, spec, path)]
    for summary in summaries:
        for line in summary.lines():
            print(line)
    return EXIT_FAILURE if any(s.rejected_count for s in summaries) else EXIT_OK


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.runs import materialize

    return EXIT_OK if materialize(settings, select=args.select, spec=_spec(settings)) else 1


def cmd_recommend(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.runs import recommend

    try:
        n = recommend(settings, Path(args.users), args.k, Path(args.out), spec=_spec(settings))
    except LookupError as exc:
        print(f"no promoted model yet ({exc}); run `nextbest materialize` first", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {n} decisions to {args.out}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.runs import evaluate

    evaluate(settings, spec=_spec(settings))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.client import read_jsonl, send_events

    report = send_events(
        settings, read_jsonl(args.file), rate=args.rate, batch_size=args.batch_size
    )
    print(report.line())
    return EXIT_OK if report.failed_batches == 0 else EXIT_FAILURE


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from serving.keys import create_key
    from storage.online import OnlineStore

    scopes = [s.strip() for s in args.scope.split(",") if s.strip()]
    store = OnlineStore.from_settings(settings)
    try:
        print(create_key(store, scopes))
    finally:
        store.dispose()
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Counts from every store, for people and for `nextbest up`'s readiness checks."""
    import json

    from storage.delta import DeltaStore
    from storage.online import OnlineStore

    info: dict[str, object] = {"home": str(settings.home_dir)}
    delta = DeltaStore.from_settings(settings)
    info["delta_events"] = delta.count("events") if delta.exists("events") else 0
    store = OnlineStore.from_settings(settings)
    try:
        promoted = store.promoted_model()
        info["promoted_model"] = promoted.version if promoted else None
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(info))
    else:
        for name, value in info.items():
            print(f"{name:<16} {value}")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.client import live_demo_events, send_events

    events = live_demo_events(seed=args.seed)
    batch = max(1, int(args.rate // 5))  # ~5 posts a second, so rates read smoothly
    report = send_events(settings, events, rate=args.rate, batch_size=batch)
    print(report.line())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from nextbest.demo import DemoConfig, write_demo

    cfg = {"small": DemoConfig.small, "medium": DemoConfig.medium, "large": DemoConfig.large}[
        args.size
    ]().replace(seed=args.seed)
    if args.ending != "fixed":  # default: the history ends now, so features start fresh
        try:
            end = None if args.ending == "now" else datetime.fromisoformat(args.ending)
        except ValueError:
            print(f"--ending: not now, fixed or an ISO time: {args.ending!r}", file=sys.stderr)
            return 2
        cfg = cfg.ending_at(end)
    counts = write_demo(Path(args.out), cfg)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextbest", description="Real-time personalization: declare once, serve fresh."
    )
    parser.add_argument("--spec", help="spec file (default: NEXTBEST_SPEC or ./nextbest.yaml)")
    parser.add_argument("--home", help="data home (default: NEXTBEST_HOME or ./.nextbest)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Handler, help_text: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--spec", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.add_argument("--home", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    add("validate", cmd_validate, "check the spec; exit 2 listing every problem")
    add("init", cmd_init, "create the data home and every store")
    up = add("up", cmd_up, "run everything on embedded defaults (API, stream, Dagster)")
    up.add_argument("--simulate", action="store_true", help="also send live demo events")
    up.add_argument("--rate", type=float, default=20.0, help="simulated events/s")
    add("api", cmd_api, "run the HTTP API")
    stream = add("stream", cmd_stream, "run the stream worker (Bytewax)")
    stream.add_argument("-i", "--process-id", type=int, default=None)
    stream.add_argument("-a", "--addresses", action="append", default=[])
    stream.add_argument("-w", "--workers", type=int, default=1, help="workers per process")
    add("dagster", cmd_dagster, "run the Dagster webserver and daemon")
    imp = add("import", cmd_import, "load history into Delta (JSONL or CSV)")
    imp.add_argument("kind", choices=["events", "items", "movielens"])
    imp.add_argument("path", help="file (events, items) or directory (movielens)")
    mat = add("materialize", cmd_materialize, "materialize assets (retrain) without the UI")
    mat.add_argument("--select", default=None, help="Dagster asset selection")
    rec = add("recommend", cmd_recommend, "batch decisions for evaluation")
    rec.add_argument("--users", required=True, help="one user id a line")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--out", required=True, help="JSONL output")
    add("eval", cmd_eval, "print the promoted model's offline metrics")
    rep = add("replay", cmd_replay, "send a JSONL file of events to the API at a rate")
    rep.add_argument("file")
    rep.add_argument("--rate", type=float, default=100.0, help="events/s")
    rep.add_argument("--batch-size", type=int, default=50)
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = add("create", cmd_keys_create, "create an API key; prints it", keys_sub)
    create.add_argument("--scope", default="ingest,decide", help="ingest,decide,admin")
    st = add("status", cmd_status, "counts from every store")
    st.add_argument("--json", action="store_true")
    sim = add("simulate", cmd_simulate, "send live demo events to the API at a rate")
    sim.add_argument("--rate", type=float, default=20.0)
    sim.add_argument("--seed", type=int, default=11)
    demo = add("demo", cmd_demo, "write the deterministic demo shop as JSONL files")
    demo.add_argument("--out", default="demo-data")
    demo.add_argument("--size", choices=["small", "medium", "large"], default="small")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--ending",
        default="now",
        help="when the history ends: now (default), an ISO time, or fixed (early 2025)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except Exception as exc:  # pydantic ValidationError from env vars: say which
        print(f"invalid settings: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return args.handler(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
