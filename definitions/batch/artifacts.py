"""Model artifacts under `<home>/models/`: the `.npz`, its metrics, and the candidate pointer.

The candidate pointer (`candidate.json`) is how `item_model` hands the version it just
trained to `model_evaluation` and `model_registry`, also when those run in a later
run (`--select model_registry`); the registry, not this file, says what is served.
"""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

CANDIDATE = "candidate.json"


def new_version(events_version: int) -> str:
    """Sortable, unique: UTC time, the bronze Delta version it was trained on, a nonce."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"m{stamp}-e{events_version}-{uuid4().hex[:6]}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def write_candidate(models_dir: Path, info: dict[str, Any]) -> None:
    _write_json(models_dir / CANDIDATE, info)


def read_candidate(models_dir: Path) -> dict[str, Any]:
    path = models_dir / CANDIDATE
    if not path.exists():
        raise FileNotFoundError(f"no trained model at {path}; materialize item_model first")
    return json.loads(path.read_text())


def write_metrics(models_dir: Path, version: str, metrics: dict[str, Any]) -> Path:
    path = models_dir / f"{version}.metrics.json"
    _write_json(path, metrics)
    return path


def read_metrics(models_dir: Path, version: str) -> dict[str, Any]:
    path = models_dir / f"{version}.metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"model {version} has no metrics; materialize model_evaluation")
    return json.loads(path.read_text())


def write_json_file(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace a JSON side file (uplift pointer, OPE report)."""
    _write_json(path, data)


def read_json_file(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None
