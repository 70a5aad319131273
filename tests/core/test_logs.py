"""`nextbest.logs`: stdlib and structlog lines through one renderer with the same fields,
the request context, levels, the console format, and the readable tail `nextbest up`
shows of a dead component's JSON log."""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.supervisor import Component, Supervisor
from nextbest.logs import (
    bind_request,
    configure_logging,
    get_logger,
    note,
    readable,
    reset_logging,
    reset_request,
)
from nextbest.settings import Settings


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[None]:
    yield
    reset_logging()


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path / "home", _env_file=None, **kw)  # type: ignore[call-arg]


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_stdlib_and_structlog_lines_share_fields_and_the_request_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    configure_logging(_settings(tmp_path, log_format="json"), "stream")
    configure_logging(_settings(tmp_path, log_format="json"), "stream")  # idempotent
    token = bind_request(request_id="r1")
    note(decision_id="d1")
    logging.getLogger("pipelines.x").warning("stdlib %s", "line")
    get_logger("nextbest.y").info("structured", partition=3)
    reset_request(token)
    logging.getLogger("pipelines.x").debug("below the level")
    logging.getLogger("pipelines.x").info("after the request")
    first, second, third = _json_lines(capsys.readouterr().err)
    assert first["event"] == "stdlib line" and first["level"] == "warning"
    assert first["logger"] == "pipelines.x" and second["logger"] == "nextbest.y"
    assert second["partition"] == 3
    for line in (first, second):
        assert line["component"] == "stream"
        assert line["request_id"] == "r1" and line["decision_id"] == "d1"
    assert "request_id" not in third
    assert str(third["timestamp"]).endswith("Z")


def test_debug_level_and_the_console_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    configure_logging(_settings(tmp_path, log_format="console", log_level="debug"), "launcher")
    logging.getLogger("launcher.z").debug("shown at debug")
    err = capsys.readouterr().err
    assert "shown at debug" in err and "component=launcher" in err
    assert not err.lstrip().startswith("{")


def test_readable_renders_json_lines_and_leaves_others() -> None:
    line = json.dumps(
        {
            "event": "cannot open",
            "level": "warning",
            "logger": "pipelines.status",
            "timestamp": "2026-12-03T19:40:00.123456Z",
            "component": "stream",
            "partition": 2,
            "exception": "Traceback ...\nOSError: disk full",
        }
    )
    assert readable(line) == (
        "19:40:00.123 WARNING pipelines.status: cannot open partition=2 | OSError: disk full"
    )
    assert readable("plain text from a library") == "plain text from a library"
    assert readable("{not json") == "{not json"


def test_the_supervisor_tail_of_a_json_log_reads_as_lines(tmp_path: Path) -> None:
    sup = Supervisor(_settings(tmp_path))
    record = {
        "event": "boom",
        "level": "error",
        "logger": "x",
        "timestamp": "2026-12-03T01:02:03.5Z",
    }
    (sup.logs / "api.log").write_text(json.dumps(record) + "\nTraceback line\n")
    assert sup.log_tail(Component("api", [])) == [
        "    | 01:02:03.5 ERROR   x: boom",
        "    | Traceback line",
    ]
