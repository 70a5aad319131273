"""Structured logs: `configure_logging(settings, component)`, called once by each entry
point (`nextbest <command>`, `python -m pipelines`, `serving.run`).

Every line, from structlog loggers and from stdlib `logging` (libraries, our modules'
`logging.getLogger(__name__)`), goes through one structlog `ProcessorFormatter` on
stderr: JSON (one object a line, for log shippers) or a console rendering (a person at a
terminal; the default when stderr is a TTY). Each carries `timestamp` (ISO 8601, UTC),
`level`, `logger`, `component` (api, stream, dagster, launcher) and, inside an API
request, `request_id` and, on a decision, `decision_id` (`bind_request`, `note`).

The request context is one mutable dict in a ContextVar rather than structlog's
per-key context variables: a field noted in a worker thread (anyio copies the context,
not the dict) is still seen by the request's access-log line, and binding costs one
`ContextVar.set` per request.
"""

import json
import logging
import sys
from contextvars import ContextVar, Token
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from nextbest.settings import Settings

COMPONENTS = ("api", "stream", "dagster", "launcher")
QUIET = {"httpx": logging.WARNING, "httpcore": logging.WARNING}
"""Libraries that log every request at INFO: raised to WARNING unless the level is DEBUG."""

_REQUEST: ContextVar[dict[str, str] | None] = ContextVar("nextbest_request", default=None)


def bind_request(**fields: str) -> Token[dict[str, str] | None]:
    """Start a request's log context (fields such as request_id); `reset_request` ends it."""
    return _REQUEST.set(dict(fields))


def reset_request(token: Token[dict[str, str] | None]) -> None:
    _REQUEST.reset(token)


def note(**fields: str) -> None:
    """Add fields (e.g. decision_id) to the current request's log context, if any."""
    current = _REQUEST.get()
    if current is not None:
        current.update(fields)


def request_fields() -> dict[str, str]:
    """The current request's log context (empty outside a request)."""
    return _REQUEST.get() or {}


def _add_request(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    current = _REQUEST.get()
    if current:
        for key, value in current.items():
            event.setdefault(key, value)
    return event


def _drop_color(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    event.pop("color_message", None)  # uvicorn's ANSI copy of the message
    return event


def _component(name: str) -> Processor:
    def add(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        event.setdefault("component", name)
        return event

    return add


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so a second `configure_logging` replaces it and leaves others' handlers."""


class _Stderr:
    """Whatever `sys.stderr` is at write time (pytest's capture swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def wants_json(settings: Settings) -> bool:
    if settings.log_format is not None:
        return settings.log_format == "json"
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


def configure_logging(settings: Settings, component: str) -> None:
    """Route structlog and stdlib logging through one renderer on stderr; idempotent
    (a later call replaces the earlier setup, e.g. a command that starts the API)."""
    as_json = wants_json(settings)
    level = logging.getLevelNamesMapping()[settings.log_level]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(default=str)
        tail: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty())
        tail = []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _component(component),
            *tail,
            renderer,
        ],
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _Handler(_Stderr())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else quiet)
    logging.captureWarnings(True)  # warnings.warn(...) lines get the same fields


def reset_logging() -> None:
    """Undo `configure_logging` (tests that configure it against a captured stream)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(name: str) -> Any:
    """A structlog logger (key-value fields) that renders like every other line."""
    return structlog.stdlib.get_logger(name)


def readable(line: str) -> str:
    """A JSON log line as one short line for a person (`nextbest up` shows the tail of a
    dead component's log); anything else unchanged."""
    text = line.strip()
    if not text.startswith("{"):
        return line
    try:
        record = json.loads(text)
    except ValueError:
        return line
    if not isinstance(record, dict) or "event" not in record:
        return line
    when = str(record.pop("timestamp", ""))[11:23].rstrip("Z")
    level = str(record.pop("level", "")).upper()
    logger = record.pop("logger", "")
    event = record.pop("event")
    record.pop("component", None)
    exception = record.pop("exception", None)
    extra = " ".join(f"{k}={v}" for k, v in record.items())
    out = f"{when} {level:<7} {logger}: {event}" + (f" {extra}" if extra else "")
    if exception:
        out += " | " + str(exception).strip().splitlines()[-1]
    return out
