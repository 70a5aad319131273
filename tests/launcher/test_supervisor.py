"""The supervisor behind `nextbest up`: no component outlives it, however it dies."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.common import ROOT

SCRIPT = """
import sys
from nextbest.settings import Settings
from launcher.supervisor import Component, Supervisor
sup = Supervisor(Settings(home=sys.argv[1], _env_file=None))
child = Component("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
sup.start(child)
print(child.process.pid, flush=True)
import time; time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_components_die_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "home")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)  # no chance to stop its children itself
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the component outlived a SIGKILLed supervisor"


def test_dagster_reads_its_code_from_one_code_server(tmp_path: Path) -> None:
    """`nextbest up` runs one persistent code server; the webserver and the daemon load
    the location from it through DAGSTER_HOME/workspace.yaml (the daemon would otherwise
    re-import the code location every 60 s), under the location name `-m` gave it."""
    import yaml

    from launcher.stack import CODE_LOCATION, dagster_components, grpc_serving
    from nextbest.settings import Settings

    settings = Settings(home=tmp_path / "home", _env_file=None)  # type: ignore[call-arg]
    (code, web, daemon), port = dagster_components(settings)
    workspace = settings.dagster_home / "workspace.yaml"
    entry = yaml.safe_load(workspace.read_text())["load_from"][0]["grpc_server"]
    assert entry == {"host": "127.0.0.1", "port": port, "location_name": CODE_LOCATION}
    assert code.argv[1:3] == ["code-server", "start"]
    assert code.argv[code.argv.index("-p") + 1] == str(port)
    for component in (web, daemon):
        assert component.argv[-2:] == ["-w", str(workspace)], component.argv
        assert "-m" not in component.argv
    assert not grpc_serving(port, timeout_s=0.5)  # nothing serves there yet
