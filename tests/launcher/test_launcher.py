"""The command line as a newcomer meets it: keys, replay errors, the pseudonymization
key, doctor on broken stream recovery, the home locks and the supervisor's messages."""

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.supervisor import Component, Supervisor
from nextbest.locks import EXIT_LOCKED, AlreadyRunning, InstanceLock, holder
from nextbest.settings import Settings
from tests.support.common import ROOT


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("NEXTBEST_HOME", str(home))
    monkeypatch.setenv("NEXTBEST_SPEC", str(ROOT / "nextbest.yaml"))
    for name in ("NEXTBEST_API_KEY", "NEXTBEST_ONLINE_URL", "NEXTBEST_PSEUDONYMIZATION_KEY"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_keys_create_with_an_unknown_scope_names_the_valid_ones(home: Path, capsys) -> None:
    assert main(["keys", "create", "--scope", "foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown scope (foo); valid scopes: ingest, decide, admin" in err
    assert "Traceback" not in err


def test_keys_alone_shows_its_commands(home: Path, capsys) -> None:
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert "create" in out and "list" in out and "revoke" in out


def test_keys_list_and_revoke(home: Path, capsys) -> None:
    assert main(["keys", "create", "--scope", "decide"]) == 0
    key = capsys.readouterr().out.strip()
    key_id = key.split("_")[1]
    assert main(["keys", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if key_id in line]
    assert len(listed) == 1 and "decide" in listed[0] and listed[0].endswith("no")
    assert main(["keys", "revoke", key_id]) == 0
    assert f"revoked {key_id}" in capsys.readouterr().out
    main(["keys", "list"])
    assert next(ln for ln in capsys.readouterr().out.splitlines() if key_id in ln).endswith("yes")
    assert main(["keys", "revoke", "no-such-key"]) == 1
    assert "no API key 'no-such-key'" in capsys.readouterr().err


def test_replay_of_a_missing_file_is_a_clear_error(home: Path, capsys) -> None:
    assert main(["replay", str(home / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{home / 'nope.jsonl'}: no such file"


def test_init_writes_a_pseudonymization_key_once(home: Path, capsys) -> None:
    assert main(["init"]) == 0
    path = home / "pseudonymization_key"
    assert str(path) in capsys.readouterr().out
    secret = path.read_text().strip()
    assert len(secret) >= 40 and secret != "nextbest-local-development-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["init"]) == 0
    assert path.read_text().strip() == secret, "a second init never replaces the key"


def test_init_leaves_the_key_to_the_environment_when_set(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEXTBEST_PSEUDONYMIZATION_KEY", "from-the-environment-0123456789")
    assert main(["init"]) == 0
    assert not (home / "pseudonymization_key").exists()


def test_a_second_holder_of_a_role_is_told_who_runs_it(tmp_path: Path) -> None:
    with InstanceLock(tmp_path, "api"):
        held = holder(tmp_path, "api")
        assert held is not None and held.pid == os.getpid()
        with pytest.raises(AlreadyRunning, match=rf"already running on .*\(pid {os.getpid()}"):
            InstanceLock(tmp_path, "api").acquire()
    assert holder(tmp_path, "api") is None


def test_doctor_finds_and_resets_broken_stream_recovery(home: Path, capsys) -> None:
    from pipelines.run import ensure_recovery_dir

    assert main(["init"]) == 0
    settings = Settings()
    ensure_recovery_dir(settings.recovery_dir)
    (settings.recovery_dir / "part-1.sqlite3").unlink()  # what a half-restored backup leaves
    capsys.readouterr()
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "stream recovery    BROKEN: recovery partitions [1] are missing" in out
    assert "nextbest doctor --reset-stream" in out

    started = time.monotonic()
    stream = subprocess.run(
        [sys.executable, "-m", "launcher", "stream"], capture_output=True, text=True, timeout=120
    )
    assert stream.returncode == 3, stream.stderr
    assert "cannot resume" in stream.stderr and "nextbest doctor --reset-stream" in stream.stderr
    assert "Traceback" not in stream.stderr
    assert time.monotonic() - started < 60

    assert main(["doctor", "--reset-stream"]) == 0
    assert "replays the event log" in capsys.readouterr().out
    assert main(["doctor"]) == 0
    assert "stream recovery    ok" in capsys.readouterr().out


def test_stream_refuses_a_home_whose_stream_runs(home: Path) -> None:
    with InstanceLock(home, "stream"):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "launcher", "stream"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == EXIT_LOCKED
        assert f"already running on {home} (pid {os.getpid()}, since" in out.stderr
        assert time.monotonic() - started < 30


def _supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(Settings(home=tmp_path / "home", _env_file=None))  # type: ignore[call-arg]


def _wait_dead(component: Component) -> None:
    assert component.process is not None
    component.process.wait(timeout=30)


def test_supervisor_shows_the_log_tail_and_gives_up(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    crash = "import sys; [print('line', i) for i in range(30)]; sys.exit('boom: bad config')"
    child = Component("crasher", [sys.executable, "-c", crash])
    sup.start(child)
    messages: list[str] = []
    for _ in range(6):
        _wait_dead(child)
        messages.extend(sup.watch_once())
    first = messages.index(
        f"crasher exited with 1; restarting. Last lines of {sup.logs / 'crasher.log'}:"
    )
    assert messages[first + 10] == "    | boom: bad config"
    assert "    | line 29" in messages[first + 1 : first + 11]
    assert any("died 6 times within a minute (last exit 1); giving up" in m for m in messages)
    assert sup.gave_up() == [child]
    assert sup.watch_once() == []


def test_supervisor_does_not_restart_a_component_whose_home_is_taken(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    script = f"import sys; print('nextbest api is already running'); sys.exit({EXIT_LOCKED})"
    child = Component("api", [sys.executable, "-c", script])
    sup.start(child)
    _wait_dead(child)
    messages = sup.watch_once()
    assert messages[0].startswith(f"api exited with {EXIT_LOCKED} and cannot be restarted")
    assert "    | nextbest api is already running" in messages
    assert sup.gave_up() == [child]
