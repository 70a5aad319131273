"""tools/check_layers.py: the dependency rule, import cycles and private names, checked
on a tiny project tree and on this repository."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "check_layers.py"


def check(root: Path) -> tuple[int, list[str]]:
    out = subprocess.run(
        [sys.executable, str(TOOL), str(root)], capture_output=True, text=True, check=False
    )
    return out.returncode, out.stdout.splitlines()


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_repository_keeps_the_rule() -> None:
    code, lines = check(ROOT)
    assert code == 0, "\n".join(lines)


def test_every_kind_of_break_is_reported(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "nextbest/__init__.py": "",
            "nextbest/a.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from nextbest.b import B\n",  # never runs: no cycle
            "nextbest/b.py": "import nextbest.a\n_hidden = 1\n",
            "storage/__init__.py": "",
            "storage/s.py": "def f():\n    import serving.app\n",  # lazy still counts
            "serving/__init__.py": "",
            "serving/app.py": "from nextbest.b import _hidden\n",
            "launcher/__init__.py": "",
            "launcher/stack.py": "from launcher.supervisor import run\n",
            "launcher/supervisor.py": "def run():\n    from launcher import stack\n",
        },
    )
    code, lines = check(tmp_path)
    assert code == 1
    assert lines[:-1] == [
        "serving/app.py:1: imports the private name _hidden of nextbest.b",
        "storage/s.py:2: storage must not import serving",
        "import cycle (module:line of the import): "
        "launcher.stack:1 -> launcher.supervisor:2 -> launcher.stack",
    ]
    assert lines[-1] == "layers: 10 files checked, 3 imports break the rule"
