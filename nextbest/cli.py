"""The `nextbest` command line.

Each command builds `Settings` once and imports its component lazily, so `nextbest
validate` stays fast and the apps never import each other.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nextbest.settings import Settings

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


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Create the data home and every store, idempotently."""
    from nextbest.spec_loader import SpecError, load_spec

    try:
        spec = load_spec(settings.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    from storage.bootstrap import init_stores

    for line in init_stores(settings, spec):
        print(line)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextbest", description="Real-time personalization: declare once, serve fresh."
    )
    parser.add_argument("--spec", help="spec file (default: NEXTBEST_SPEC or ./nextbest.yaml)")
    parser.add_argument("--home", help="data home (default: NEXTBEST_HOME or ./.nextbest)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--spec", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.add_argument("--home", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        p.set_defaults(handler=handler)
        return p

    add("validate", cmd_validate, "check the spec; exit 2 listing every problem")
    add("init", cmd_init, "create the data home and the stores")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except Exception as exc:  # pydantic ValidationError from env vars: say which
        print(f"invalid settings: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return args.handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
