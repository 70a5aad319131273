"""The `nextbest` command line.

Each command builds `Settings` once and imports its component lazily, so `nextbest
validate` stays fast and the apps never import each other.
"""

import argparse
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from launcher.common import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, spec_or_exit
from nextbest.locks import EXIT_LOCKED, AlreadyRunning, InstanceLock
from nextbest.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
LOG_COMPONENTS = {"api": "api", "stream": "stream", "materialize": "dagster"}
"""The `component` field of a command's log lines (nextbest.logs); others: launcher."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "spec", None):
        overrides["spec"] = Path(args.spec)
    if getattr(args, "home", None):
        overrides["home"] = Path(args.home)
    return Settings(**overrides)  # type: ignore[arg-type]


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.spec.loader import SpecError, load_spec

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


PSEUDONYMIZATION_KEY_FILE = "pseudonymization_key"


def ensure_pseudonymization_key(settings: Settings) -> str | None:
    """A fresh random secret in `<home>/pseudonymization_key` (mode 0600) unless the
    file exists or NEXTBEST_PSEUDONYMIZATION_KEY is set; never overwrites. Returns the
    line to print, or None when nothing was written."""
    if os.environ.get("NEXTBEST_PSEUDONYMIZATION_KEY"):
        return None
    path = settings.home_dir / PSEUDONYMIZATION_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return f"pseudonym key {path} (new random secret, mode 0600; back it up)"


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Create the data home and every store, idempotently."""
    from storage.bootstrap import init_stores
    from storage.kafka_topic import TopicMismatchError

    spec = spec_or_exit(settings)
    written = ensure_pseudonymization_key(settings)
    try:
        for line in init_stores(settings, spec):
            print(line, flush=True)
    except TopicMismatchError as exc:
        print(f"init: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    if written:
        print(written)
    return EXIT_OK


def _locked(settings: Settings, role: str) -> InstanceLock | None:
    """Take the home's lock for `role`, or print who holds it and return None."""
    try:
        return InstanceLock(settings.home_dir, role).acquire()
    except AlreadyRunning as exc:
        print(exc, file=sys.stderr, flush=True)
        return None


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    lock = _locked(settings, "api")  # before the heavy imports: a second one fails fast
    if lock is None:
        return EXIT_LOCKED
    with lock:
        from serving.run import run_api

        spec_or_exit(settings)
        if args.workers is not None:  # the processes share the port and the home's lock
            settings = settings.model_copy(update={"api_workers": args.workers})
        run_api(settings)
    return EXIT_OK


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.locks import holder, stream_role

    held = holder(settings.home_dir, stream_role(args.process_id))
    if held is not None:  # fail fast, before importing Bytewax; run_stream takes the lock
        print(AlreadyRunning(settings.home_dir, held), file=sys.stderr)
        return EXIT_LOCKED
    from pipelines.run import run_stream_cli

    return run_stream_cli(
        settings,
        spec_or_exit(settings),
        process_id=args.process_id,
        addresses=args.addresses or None,
        workers_per_process=args.workers,
    )


def cmd_dagster(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.supervisor import dagster_commands, run_foreground

    spec_or_exit(settings)
    lock = _locked(settings, "dagster")
    if lock is None:
        return EXIT_LOCKED
    with lock:
        return run_foreground(settings, dagster_commands(settings))


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.stack import bring_up

    if args.api_workers is not None:
        settings = settings.model_copy(update={"api_workers": args.api_workers})
    if args.profile == "scale":  # Kafka, S3, PostgreSQL: launcher/scale.py
        from launcher.scale import bring_up_scale

        spec_or_exit(settings)
        return bring_up_scale(settings)
    return bring_up(settings, spec_or_exit(settings), simulate=args.simulate, rate=args.rate)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.batch import importer

    spec = spec_or_exit(settings)
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
    """Run in this process on the home's Dagster instance; Dagster's own (debug) output
    goes to `<home>/logs/materialize.log`, a short summary to the terminal."""
    from launcher.materialize import materialize_with_summary

    spec = spec_or_exit(settings)
    return materialize_with_summary(settings, spec, select=args.select)


def cmd_recommend(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.runs import recommend

    try:
        n = recommend(
            settings, Path(args.users), args.k, Path(args.out), spec=spec_or_exit(settings)
        )
    except LookupError as exc:
        print(f"no promoted model yet ({exc}); run `nextbest materialize` first", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {n} decisions to {args.out}")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.commands import client_settings
    from nextbest.client import live_demo_events, send_events

    events = live_demo_events(seed=args.seed)
    batch = max(1, int(args.rate // 5))  # ~5 posts a second, so rates read smoothly
    report = send_events(client_settings(settings), events, rate=args.rate, batch_size=batch)
    for line in report.details():
        print(line)
    print(report.line())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from nextbest.demo.shop import DemoConfig, write_demo

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
    out = Path(args.out)
    counts = write_demo(out, cfg)
    print(f"wrote the {args.size} demo shop to {out.resolve()}/")
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return EXIT_OK


def _lazy(name: str) -> Handler:
    """A handler imported from `launcher.commands` only when its command runs."""

    def handler(args: argparse.Namespace, settings: Settings) -> int:
        from launcher import commands

        return getattr(commands, name)(args, settings)

    return handler


def _keys_usage(parser: argparse.ArgumentParser) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        parser.print_help()
        return EXIT_OK

    return handler


class _Version(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib.metadata import version

        print(f"nextbest {version('nextbest')}")
        parser.exit()


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextbest", description="Real-time personalization: declare once, serve fresh."
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    parser.add_argument("--spec", help="spec file (default: NEXTBEST_SPEC or ./nextbest.yaml)")
    parser.add_argument("--home", help="data home (default: NEXTBEST_HOME or ./.nextbest)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Handler, help_text: str, parent: Any = sub, spec_help: str = ""
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--spec", help=spec_help or argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.add_argument("--home", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    spec_help = "spec file (default: NEXTBEST_SPEC or ./nextbest.yaml)"
    add(
        "validate",
        cmd_validate,
        "check the spec; exit 2 listing every problem",
        spec_help=spec_help,
    )
    add("init", cmd_init, "create the data home, every store and the pseudonymization key")
    up = add("up", cmd_up, "run everything on embedded defaults (API, stream, Dagster)")
    up.add_argument("--simulate", action="store_true", help="also send live demo events")
    up.add_argument("--rate", type=float, default=20.0, help="simulated events/s (default 20)")
    up.add_argument(
        "--api-workers", type=_positive, default=None,
        help="API server processes (default: NEXTBEST_API_WORKERS or 1)",
    )  # fmt: skip
    up.add_argument(
        "--profile", choices=["embedded", "scale"], default="embedded",
        help="scale: Kafka (Tansu), S3 (SeaweedFS), PostgreSQL at NEXTBEST_ONLINE_URL",
    )  # fmt: skip
    api = add("api", cmd_api, "run the HTTP API (one per data home)")
    api.add_argument(
        "-w", "--workers", type=_positive, default=None,
        help="server processes on the one port (default: NEXTBEST_API_WORKERS or 1)",
    )  # fmt: skip
    stream = add("stream", cmd_stream, "run the stream worker (Bytewax; one per data home)")
    stream.add_argument(
        "-i", "--process-id", type=int, default=None,
        help="this process's index in a cluster (with -a); omit for one process",
    )  # fmt: skip
    stream.add_argument(
        "-a", "--addresses", action="append", default=[], metavar="HOST:PORT",
        help="address of every cluster process, in process-id order (repeat -a)",
    )  # fmt: skip
    stream.add_argument("-w", "--workers", type=int, default=1, help="workers per process")
    add("dagster", cmd_dagster, "run the Dagster webserver and daemon")
    imp = add("import", cmd_import, "load history into Delta (JSONL or CSV)")
    imp.add_argument("kind", choices=["events", "items", "movielens"])
    imp.add_argument("path", help="file (events, items) or directory (movielens)")
    mat = add("materialize", cmd_materialize, "materialize assets (retrain) without the UI")
    mat.add_argument("--select", default=None, help="Dagster asset selection (default: all)")
    rec = add("recommend", cmd_recommend, "batch decisions for evaluation")
    rec.add_argument("--users", required=True, help="one user id a line")
    rec.add_argument("--k", type=int, default=10, help="actions per user (default 10)")
    rec.add_argument("--out", required=True, help="JSONL output")
    add("eval", _lazy("cmd_eval"), "print the promoted model's offline metrics")
    rep = add("replay", _lazy("cmd_replay"), "send a JSONL file of events to the API at a rate")
    rep.add_argument("file", help="JSONL, one event a line")
    rep.add_argument("--rate", type=float, default=100.0, help="events/s (default 100)")
    rep.add_argument("--batch-size", type=int, default=50, help="events a request (default 50)")
    keys = sub.add_parser("keys", help="API keys: create, list, revoke", description="API keys")
    keys.set_defaults(handler=_keys_usage(keys))
    keys_sub = keys.add_subparsers(dest="keys_command")
    create = add("create", _lazy("cmd_keys_create"), "create an API key; prints it once", keys_sub)
    create.add_argument(
        "--scope", default="ingest,decide",
        help="comma-separated, from ingest, decide, admin (default: ingest,decide)",
    )  # fmt: skip
    add("list", _lazy("cmd_keys_list"), "every API key: id, scopes, created, revoked", keys_sub)
    revoke = add("revoke", _lazy("cmd_keys_revoke"), "revoke an API key by its id", keys_sub)
    revoke.add_argument("key_id", help="the id from `nextbest keys list` (nb_<id>_...)")
    st = add("status", _lazy("cmd_status"), "counts from every store and what is running")
    st.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    doc = add(
        "doctor", _lazy("cmd_doctor"), "check the data home; --reset-stream clears stream recovery"
    )
    doc.add_argument(
        "--reset-stream", action="store_true",
        help="delete the stream's recovery state (the stream then replays the event log)",
    )  # fmt: skip
    sim = add("simulate", cmd_simulate, "send live demo events to the API at a rate")
    sim.add_argument("--rate", type=float, default=20.0, help="events/s (default 20)")
    sim.add_argument("--seed", type=int, default=11, help="random seed of the simulated shop")
    schema = add("schema", _lazy("cmd_schema"), "print the spec's JSON Schema (for editors)")
    schema.add_argument("--output", "-o", help="write it to this file instead")
    demo = add("demo", cmd_demo, "write the deterministic demo shop as JSONL files")
    demo.add_argument("--out", default="demo-data", help="output directory (default ./demo-data)")
    demo.add_argument(
        "--size", choices=["small", "medium", "large"], default="small", help="default small"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
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
    from nextbest.logs import configure_logging

    configure_logging(settings, LOG_COMPONENTS.get(args.command, "launcher"))
    try:
        return args.handler(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
