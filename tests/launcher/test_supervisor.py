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
