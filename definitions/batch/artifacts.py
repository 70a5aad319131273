"""Model artifacts under the models root (`storage.artifacts.ArtifactStore`: `<home>/models/`
or an object-store prefix): the `.npz`, its metrics, and the candidate pointer.

The candidate pointer (`candidate.json`) is how `item_model` hands the version it just
trained to `model_evaluation` and `model_registry`, also when those run in a later
run (`--select model_registry`); the registry, not this file, says what is served.
"""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from storage.artifacts import Artifact, ArtifactStore

CANDIDATE = "candidate.json"


def new_version(events_version: int) -> str:
    """Sortable, unique: UTC time, the bronze Delta version it was trained on, a nonce."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"m{stamp}-e{events_version}-{uuid4().hex[:6]}"


def write_candidate(models_dir: ArtifactStore, info: dict[str, Any]) -> None:
    models_dir.write_json(CANDIDATE, info)


def read_candidate(models_dir: ArtifactStore) -> dict[str, Any]:
    info = models_dir.read_json(CANDIDATE)
    if info is None:
        raise FileNotFoundError(
            f"no trained model at {models_dir / CANDIDATE}; materialize item_model first"
        )
    return info


def write_metrics(models_dir: ArtifactStore, version: str, metrics: dict[str, Any]) -> str:
    name = f"{version}.metrics.json"
    models_dir.write_json(name, metrics)
    return models_dir.uri(name)


def read_metrics(models_dir: ArtifactStore, version: str) -> dict[str, Any]:
    metrics = models_dir.read_json(f"{version}.metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"model {version} has no metrics; materialize model_evaluation")
    return metrics


def write_json_file(path: Artifact | Path, data: dict[str, Any]) -> None:
    """Atomically replace a JSON side file (uplift pointer, OPE report)."""
    if isinstance(path, Artifact):
        path.store.write_json(path.name, data)
        return
    ArtifactStore(str(path.parent)).write_json(path.name, data)


def read_json_file(path: Artifact | Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None
