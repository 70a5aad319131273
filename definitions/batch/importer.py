"""Historical loads into Delta: events and items from JSONL/CSV, and MovieLens 100k.

Events are checked with `nextbest.ingest.validation.accept_event` (the API's own rules and
bounds, `nextbest.ingest.limits.Limits`: old history is fine, future timestamps are not); a
bad row is reported with its line number and skipped, never loaded. Accepted rows
are appended to bronze `events` in chunks with Delta transaction ids
(`app_id="import-<sha256 of the file>"`, one batch version per chunk), so importing
the same file twice, or resuming after a crash, never duplicates a row. With
`privacy.consent` in the spec each chunk is screened as the API screens a batch
(`definitions.batch.import_consent`): events without consent are dropped or anonymized, and
the file's consent events are recorded in the online store.

File formats (`nextbest import`):
- events JSONL: one Event object per line (docs/architecture.md#the-event-record).
- events CSV: header with Event field names (`event_id, type, user_id, anonymous_id,
  item_id, ts, value, context, properties`); `context` and `properties` are JSON
  text; empty cells are absent values. `ts` is ISO 8601 or epoch seconds.
- items JSONL/CSV: `item_id` plus the spec's item attributes (CSV cells are cast to
  the declared types; bool accepts true/false/1/0/yes/no).
- MovieLens: a GroupLens ml-100k folder (`u.data` tab-separated user, item, rating,
  epoch seconds; `u.item` pipe-separated with 19 genre flags).
"""

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from definitions.batch.history import ITEMS_TABLE
from definitions.batch.import_consent import ImportConsent
from nextbest.ingest.events import Event
from nextbest.ingest.limits import Limits
from nextbest.ingest.validation import EventRejected, accept_event
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.schemas import events_to_table
from storage.delta.store import DeltaStore

CHUNK_ROWS = 50_000
MAX_REPORTED = 1000
_ARROW = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
ML_GENRES = (
    "unknown", "action", "adventure", "animation", "children", "comedy", "crime",
    "documentary", "drama", "fantasy", "film_noir", "horror", "musical", "mystery",
    "romance", "sci_fi", "thriller", "war", "western",
)  # fmt: skip


@dataclass
class ImportSummary:
    """What an import did; `rejected` holds (line number, reason), first 1000 kept.
    With consent: `dropped` accepted events were not stored, `aggregated` were stored
    without the person, and `consent_recorded` answers went to `nb_consent`."""

    path: str
    read: int = 0
    accepted: int = 0
    written: int = 0
    rejected_count: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    consent: bool = False
    dropped: int = 0
    aggregated: int = 0
    consent_recorded: int = 0

    def reject(self, line: int, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REPORTED:
            self.rejected.append((line, reason))

    def lines(self) -> list[str]:
        """Human summary: counts, then one line per rejected row."""
        loaded = self.accepted - self.dropped - self.written
        head = (
            f"{self.path}: read {self.read}, accepted {self.accepted}, "
            f"written {self.written} (already loaded: {loaded}), "
            f"rejected {self.rejected_count}"
        )
        if self.consent:
            head += (
                f"; without consent: dropped {self.dropped}, aggregated {self.aggregated}; "
                f"consent answers recorded {self.consent_recorded}"
            )
        out = [head]
        out += [f"  line {line}: {reason}" for line, reason in self.rejected]
        if self.rejected_count > len(self.rejected):
            out.append(f"  ... and {self.rejected_count - len(self.rejected)} more")
        return out


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise ValueError(f"{path}: unknown format {suffix!r}; use .jsonl or .csv")


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, raw object) per record; a line that is not JSON yields an
    `EventRejected` as its object so the caller reports it with its line."""
    if _format(path) == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, EventRejected(f"not JSON: {exc.msg} at column {exc.colno}")
                except RecursionError:
                    yield n, EventRejected("nested too deep")
        return
    with path.open(encoding="utf-8", newline="") as fh:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row


def csv_event(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row as an Event-shaped dict: empty cells dropped, JSON columns parsed."""
    out: dict[str, Any] = {}
    for key, cell in row.items():
        if key is None:
            raise EventRejected("more cells than header columns")
        if cell is None or cell == "":
            continue
        if key in ("context", "properties"):
            try:
                out[key] = json.loads(cell)
            except json.JSONDecodeError as exc:
                raise EventRejected(f"{key}: not JSON ({exc.msg})") from None
        elif key == "value":
            try:
                out[key] = float(cell)
            except ValueError:
                raise EventRejected(f"value: {cell!r} is not a number") from None
        elif key == "ts" and _is_number(cell):
            out[key] = float(cell)
        else:
            out[key] = cell
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _append_events(
    store: DeltaStore,
    events: list[Event],
    *,
    app_id: str,
    chunk: int,
    now: datetime,
    consent: ImportConsent | None,
) -> int:
    """Screen a chunk (with consent) and append what is kept as batch `chunk`."""
    if consent is not None:
        events = consent.keep(events)
    if not events:
        return 0
    table = events_to_table(events, partition=None, offsets=None, ingested_at=now)
    return (
        table.num_rows if store.append("events", table, app_id=app_id, batch_version=chunk) else 0
    )


def load_events(
    settings: Settings,
    spec: Spec,
    records: Iterator[tuple[int, Any]],
    *,
    app_id: str,
    label: str,
    progress: bool = True,
    total: int | None = None,
) -> ImportSummary:
    """Validate, screen for consent and append (line, raw) records; the shared core of
    every event import. Chunks are cut before screening, so they depend on the file."""
    store = DeltaStore.from_settings(settings)
    store.ensure_tables()
    consent = ImportConsent(settings, spec) if spec.privacy.consent is not None else None
    summary = ImportSummary(path=label, consent=consent is not None)
    pii_key = settings.pseudonymization_key.get_secret_value().encode()
    limits = Limits.from_settings(settings)
    batch: list[Event] = []
    seen: set[str] = set()
    chunk, now = 0, datetime.now(UTC)
    bar = tqdm(total=total, unit="ev", desc=f"import {Path(label).name}", disable=not progress)
    try:
        for line, raw in records:
            summary.read += 1
            bar.update(1)
            try:
                if isinstance(raw, EventRejected):
                    raise raw
                # The API's check and bounds (old history is fine, the future is not)
                # and its pseudonymization.
                event = accept_event(raw, spec, key=pii_key, limits=limits)
                if event.event_id in seen:
                    raise EventRejected(f"event_id {event.event_id!r} repeated in this file")
            except EventRejected as exc:
                summary.reject(line, str(exc))
                continue
            seen.add(event.event_id)
            batch.append(event)
            summary.accepted += 1
            if len(batch) >= CHUNK_ROWS:
                summary.written += _append_events(
                    store, batch, app_id=app_id, chunk=chunk, now=now, consent=consent
                )
                batch, chunk = [], chunk + 1
        if batch:
            summary.written += _append_events(
                store, batch, app_id=app_id, chunk=chunk, now=now, consent=consent
            )
    finally:
        bar.close()
        if consent is not None:
            consent.close()
            summary.dropped, summary.aggregated = consent.dropped, consent.aggregated
            summary.consent_recorded = consent.recorded
    return summary


def import_events(
    settings: Settings, spec: Spec, path: str | Path, *, progress: bool = True
) -> ImportSummary:
    """Load an events JSONL/CSV file into bronze; idempotent per file content."""
    path = Path(path)
    app_id = f"import-{file_digest(path)}"
    records = (
        (
            n,
            raw
            if _format(path) == "jsonl" or isinstance(raw, EventRejected)
            else _csv_or_reject(raw),
        )
        for n, raw in iter_records(path)
    )
    return load_events(settings, spec, records, app_id=app_id, label=str(path), progress=progress)


def _csv_or_reject(row: dict[str, Any]) -> Any:
    try:
        return csv_event(row)
    except EventRejected as exc:
        return exc


def _cast(value: Any, kind: str) -> Any:
    if value is None or value == "":
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "y", "t"):
            return True
        if text in ("false", "0", "no", "n", "f"):
            return False
        raise ValueError(f"{value!r} is not a bool")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an int")
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a float")
        return float(value)
    return str(value)


def items_table(spec: Spec, rows: list[dict[str, Any]]) -> pa.Table:
    attrs = spec.entities.item.attributes
    now = datetime.now(UTC)
    columns: dict[str, pa.Array] = {"item_id": pa.array([r["item_id"] for r in rows], pa.string())}
    for name, attr in attrs.items():
        columns[name] = pa.array([r.get(name) for r in rows], _ARROW[attr.type])
    columns["updated_at"] = pa.array([now] * len(rows), pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def upsert_items(settings: Settings, spec: Spec, rows: list[dict[str, Any]]) -> int:
    """Merge catalog rows into the Delta `items` table by item_id (last row wins)."""
    unique = list({r["item_id"]: r for r in rows}.values())
    if not unique:
        return 0
    DeltaStore.from_settings(settings).merge(ITEMS_TABLE, items_table(spec, unique), key="item_id")
    return len(unique)


def import_items(settings: Settings, spec: Spec, path: str | Path) -> ImportSummary:
    """Load a catalog JSONL/CSV into Delta `items`, upserting by item_id."""
    path = Path(path)
    attrs = spec.entities.item.attributes
    summary = ImportSummary(path=str(path))
    rows: list[dict[str, Any]] = []
    for line, raw in iter_records(path):
        summary.read += 1
        if isinstance(raw, EventRejected):
            summary.reject(line, str(raw))
            continue
        if not isinstance(raw, dict) or not raw.get("item_id"):
            summary.reject(line, "an item needs a non-empty item_id")
            continue
        unknown = sorted(k for k in raw if k not in attrs and k not in ("item_id", "updated_at"))
        if unknown:
            summary.reject(line, f"undeclared item attributes {unknown}; declare them in the spec")
            continue
        try:
            row = {"item_id": str(raw["item_id"])}
            row.update({n: _cast(raw.get(n), a.type) for n, a in attrs.items()})
        except ValueError as exc:
            summary.reject(line, str(exc))
            continue
        rows.append(row)
        summary.accepted += 1
    summary.written = upsert_items(settings, spec, rows)
    return summary


def movielens_items(spec: Spec, path: Path) -> list[dict[str, Any]]:
    """u.item rows: id|title|release|video release|url|19 genre flags (latin-1)."""
    attrs = spec.entities.item.attributes
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        flags = parts[5:24]
        genre = next((g for g, f in zip(ML_GENRES, flags, strict=False) if f == "1"), "unknown")
        row: dict[str, Any] = {"item_id": parts[0]}
        values = {"category": genre, "title": parts[1], "price": 0.0, "in_stock": True}
        row.update({k: v for k, v in values.items() if k in attrs})
        rows.append(row)
    return rows


def movielens_ratings(path: Path, *, rate_event: str) -> Iterator[tuple[int, Any]]:
    """u.data lines (user, item, rating, epoch seconds) as `rate` event dicts."""
    with path.open(encoding="latin-1") as fh:
        for n, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                yield n, EventRejected(f"expected 4 tab-separated fields, got {len(parts)}")
                continue
            user, item, rating, ts = parts
            yield (
                n,
                {
                    "event_id": f"ml-{user}-{item}-{ts}",
                    "type": rate_event,
                    "user_id": user,
                    "item_id": item,
                    "ts": int(ts) if ts.isdigit() else ts,
                    "value": float(rating) if _is_number(rating) else rating,
                },
            )


def import_movielens(
    settings: Settings, spec: Spec, directory: str | Path, *, progress: bool = True
) -> dict[str, ImportSummary]:
    """Load a GroupLens ml-100k folder: u.item -> items (category = first genre, price
    0, in stock), u.data -> `rate` events whose value is the rating."""
    directory = Path(directory)
    data, item_file = directory / "u.data", directory / "u.item"
    for required in (data, item_file):
        if not required.exists():
            raise FileNotFoundError(f"{required} not found; expected the ml-100k layout")
    rate = next((n for n, e in spec.events.items() if e.value == "required" and e.entity), None)
    if rate is None:
        raise ValueError("the spec declares no item event with a required value (like `rate`)")
    items = movielens_items(spec, item_file)
    item_summary = ImportSummary(path=str(item_file), read=len(items), accepted=len(items))
    item_summary.written = upsert_items(settings, spec, items)
    events = load_events(
        settings,
        spec,
        movielens_ratings(data, rate_event=rate),
        app_id=f"import-{file_digest(data)}",
        label=str(data),
        progress=progress,
    )
    return {"items": item_summary, "events": events}
