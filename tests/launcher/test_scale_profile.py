"""`nextbest up --profile scale` refuses, in plain words and before starting anything,
when it has no usable PostgreSQL (the one server it never starts itself)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.common import ROOT


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def up_scale(home: Path, online_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")}
    env |= {"NEXTBEST_HOME": str(home), "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml")}
    if online_url is not None:
        env["NEXTBEST_ONLINE_URL"] = online_url
    return subprocess.run(
        [sys.executable, "-m", "launcher", "up", "--profile", "scale"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "NEXTBEST_ONLINE_URL must name a PostgreSQL database"),
        ("sqlite:///x.db", "NEXTBEST_ONLINE_URL must name a PostgreSQL database"),
        (
            f"postgresql+psycopg://u@127.0.0.1:{closed_port()}/db",
            "PostgreSQL at NEXTBEST_ONLINE_URL unreachable",
        ),
    ],
)
def test_scale_profile_needs_a_reachable_postgresql(
    tmp_path: Path, url: str | None, message: str
) -> None:
    result = up_scale(tmp_path / "home", url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stdout
    assert not (tmp_path / "home" / "logs" / "kafka.log").exists()  # nothing was started
