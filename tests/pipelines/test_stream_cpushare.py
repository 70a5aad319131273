"""The stream bounds its native thread pools and can lower its own priority (issue #13:
its epoch-end Delta/LanceDB/Arrow work took both cores from the API)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os
import pyarrow as pa
from nextbest.settings import Settings
from pipelines.cpushare import THREAD_VARIABLES, share_cpu
before = os.nice(0)
share_cpu(Settings(_env_file=None))
print(json.dumps({
    "cpu": pa.cpu_count(), "io": pa.io_thread_count(), "nice": os.nice(0) - before,
    "env": {n: os.environ.get(n) for n in THREAD_VARIABLES},
}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")}
    clean.pop("TOKIO_WORKER_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stream_threads_bound_the_native_pools() -> None:
    got = _probe(NEXTBEST_STREAM_THREADS="1")
    assert got["cpu"] == 1 and got["io"] == 2 and got["nice"] == 0
    assert got["env"]["TOKIO_WORKER_THREADS"] == "1" and got["env"]["LANCE_CPU_THREADS"] == "1"


def test_an_operators_own_setting_wins_and_nice_applies() -> None:
    got = _probe(TOKIO_WORKER_THREADS="3", NEXTBEST_STREAM_NICE="5")
    assert got["env"]["TOKIO_WORKER_THREADS"] == "3" and got["env"]["RAYON_NUM_THREADS"] == "1"
    assert got["nice"] == 5
