"""Model artifacts (`.npz` models, JSON pointers and reports) under one root: a local
folder (`<home>/models` by default) or an object-store prefix (`NEXTBEST_MODELS_URI`, or
`models` beside an `s3://` Delta root).

Callers name artifacts relative to the root (`store / "candidate.json"`) and keep the
URI string they get back (`artifact_path` in the registry), so a model trained by
Dagster on one machine loads in an API process on another. Model classes write and read
local files (`ItemModel.save(path)`); on an object store the file goes through a
temporary folder. Writes replace whole objects atomically on both backends (a rename
locally, a single PUT remotely), so a reader never sees half an artifact.
"""

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import obstore

from nextbest.settings import Settings
from storage.objectstore import is_local, open_store

T = TypeVar("T")


class Artifact:
    """One artifact by name under an `ArtifactStore` (the few Path methods callers use)."""

    def __init__(self, store: "ArtifactStore", name: str) -> None:
        self.store = store
        self.name = name.strip("/")

    def __truediv__(self, name: str) -> "Artifact":
        return Artifact(self.store, f"{self.name}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Artifact({self.uri!r})"

    @property
    def uri(self) -> str:
        return self.store.uri(self.name)

    def exists(self) -> bool:
        return self.store.exists(self.name)

    def is_file(self) -> bool:
        return self.store.exists(self.name)

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.name)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.store.write_bytes(self.name, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())


class ArtifactStore:
    """Artifacts under `root` (local folder or `s3://bucket/prefix`)."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.local = is_local(self.root)
        self._options = dict(storage_options or {})
        self._store = None if self.local else open_store(self.root, self._options)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ArtifactStore":
        return cls(settings.models_root, settings.storage_options)

    def __truediv__(self, name: str) -> Artifact:
        return Artifact(self, name)

    def __str__(self) -> str:
        return self.root

    def uri(self, name: str) -> str:
        return f"{self.root}/{name.strip('/')}"

    def path(self, name: str) -> Path:
        """The local file of `name` (local roots only)."""
        return Path(self.root.removeprefix("file://")) / name

    def exists(self, name: str) -> bool:
        if self._store is None:
            return self.path(name).is_file()
        try:
            obstore.head(self._store, name)
            return True
        except FileNotFoundError:
            return False

    def read_bytes(self, name: str) -> bytes:
        if self._store is None:
            return self.path(name).read_bytes()
        return bytes(obstore.get(self._store, name).bytes())

    def write_bytes(self, name: str, data: bytes) -> None:
        if self._store is None:
            path = self.path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        obstore.put(self._store, name, data)

    def read_json(self, name: str) -> dict[str, Any] | None:
        return json.loads(self.read_bytes(name)) if self.exists(name) else None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.write_bytes(name, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def save(self, name: str, writer: Callable[[Path], Path]) -> str:
        """Store what `writer(path)` writes (e.g. `model.save`) as `name`; returns its URI."""
        if self._store is None:
            return str(writer(self.path(name)))
        with tempfile.TemporaryDirectory(prefix="nextbest-artifact-") as tmp:
            written = writer(Path(tmp) / Path(name).name)
            obstore.put(self._store, name, written.read_bytes())
        return self.uri(name)

    def load(self, uri: str, reader: Callable[[Path], T]) -> T:
        """`reader(path)` (e.g. `ItemModel.load`) on the artifact at `uri`: a URI this or
        another store returned, or a local path (artifacts registered before a move)."""
        if is_local(uri):
            return reader(Path(uri.removeprefix("file://")))
        if uri.startswith(self.root + "/") and self._store is not None:
            store, name = self._store, uri[len(self.root) + 1 :]
        else:
            parent, _, name = uri.rpartition("/")
            store = open_store(parent, self._options)
        data = bytes(obstore.get(store, name).bytes())
        with tempfile.TemporaryDirectory(prefix="nextbest-artifact-") as tmp:
            path = Path(tmp) / name.rsplit("/", 1)[-1]
            path.write_bytes(data)
            return reader(path)

    def available(self, uri: str) -> bool:
        """Does the artifact at `uri` exist (local path or object)?"""
        if is_local(uri):
            return Path(uri.removeprefix("file://")).is_file()
        parent, _, name = uri.rpartition("/")
        try:
            obstore.head(open_store(parent, self._options), name)
            return True
        except FileNotFoundError:
            return False


def as_artifacts(models: "ArtifactStore | Path") -> ArtifactStore:
    """An `ArtifactStore` for a models root given as a store or a local folder."""
    return models if isinstance(models, ArtifactStore) else ArtifactStore(str(models))
