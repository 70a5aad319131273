"""The command functions behind `nextbest eval`, `replay`, `schema`, `keys` and `status`/`doctor`
(the parser in `launcher.cli` imports them on use, so `nextbest validate` stays fast)."""

import argparse
import sys

from launcher.common import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, spec_or_exit
from nextbest.settings import Settings


def format_metric(value: float) -> str:
    """Counts read as counts (`users 181`), rates with four decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from definitions.runs import evaluate

    metrics = evaluate(settings, spec=spec_or_exit(settings), out=None)
    width = max((len(n) for n in metrics), default=0)
    for name, value in metrics.items():
        print(f"{name:<{width}}  {format_metric(value)}")
    return EXIT_OK


def client_settings(settings: Settings) -> Settings:
    """Client commands send NEXTBEST_API_KEY, else the key `up` keeps in the home."""
    from pydantic import SecretStr

    path = settings.home_dir / "api_key"
    if settings.api_key is None and path.is_file():
        key = path.read_text().strip()
        if key:
            return settings.model_copy(update={"api_key": SecretStr(key)})
    return settings


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from nextbest.client import check_jsonl, read_jsonl, send_events

    problem = check_jsonl(args.file)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_INVALID
    report = send_events(
        client_settings(settings),
        read_jsonl(args.file),
        rate=args.rate,
        batch_size=args.batch_size,
    )
    for line in report.details():
        print(line)
    print(report.line())
    return EXIT_OK if report.failed_batches == 0 and report.rejected == 0 else EXIT_FAILURE


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    """The spec's JSON Schema from the pydantic models; needs no spec file."""
    from pathlib import Path

    from nextbest.spec.schema import spec_json_schema_text

    text = spec_json_schema_text()
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"{args.output}: cannot write ({exc.strerror})", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote the spec's JSON Schema to {args.output}")
    return EXIT_OK


def _scopes(text: str) -> list[str] | None:
    from serving.keys import SCOPES

    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        bad = ", ".join(unknown) if unknown else "none given"
        print(f"unknown scope ({bad}); valid scopes: {', '.join(SCOPES)}", file=sys.stderr)
        return None
    return scopes


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from serving.keys import create_key
    from storage.online.store import OnlineStore

    scopes = _scopes(args.scope)
    if scopes is None:
        return EXIT_INVALID
    store = OnlineStore.from_settings(settings)
    try:
        print(create_key(store, scopes))
    finally:
        store.dispose()
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.admin import list_keys

    keys = list_keys(settings)
    print(f"{'KEY_ID':<18} {'SCOPES':<22} {'CREATED':<26} REVOKED")
    for k in keys:
        created = (k["created"] or "")[:19].replace("T", " ")
        revoked = "yes" if k["revoked"] else "no"
        print(f"{k['key_id']:<18} {','.join(k['scopes']):<22} {created:<26} {revoked}")
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.admin import revoke_key

    if not revoke_key(settings, args.key_id):
        print(f"no API key {args.key_id!r} (see `nextbest keys list`)", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"revoked {args.key_id}; the API processes of this data home refuse it at once, "
        "API processes on other machines within 30 s"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Counts from every store, for people and for `nextbest up`'s readiness checks."""
    import json

    from launcher.admin import format_status, status_info

    info = status_info(settings, spec_or_exit(settings))
    if args.json:
        print(json.dumps(info))
    else:
        for line in format_status(info):
            print(line)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from launcher.admin import doctor

    lines, code = doctor(settings, reset_stream=args.reset_stream)
    for line in lines:
        print(line)
    return code
