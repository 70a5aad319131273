"""What `Client` and `AsyncClient` share: requests, event ids and batches, answers.

Each call is described once as a `Call` (method, path, body, whether repeating it is
harmless); the two clients differ only in how they send it and sleep between tries.
"""

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from urllib.parse import quote

import httpx

from nextbest.client.retry import ApiError

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "NEXTBEST_API_KEY"
"""The variable `Settings.api_key` reads too; looked up at each request, not at import."""
BATCH_SIZE = 500
"""Events a request (the API takes up to 10,000 within its body limit, 4 MiB default)."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None
    idempotent: bool = True
    missing_ok: bool = False
    """A 404 is an answer (None), not an error: no such user or job yet."""


def user_path(user_id: str, suffix: str = "") -> str:
    return f"/v1/users/{quote(user_id, safe=':')}{suffix}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"X-API-Key": key} if key else {}


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    dump = getattr(value, "model_dump", None)  # pydantic models, e.g. nextbest's Event
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(body: Any) -> bytes:
    return json.dumps(body, default=_json_default, separators=(",", ":")).encode()


def with_event_id(event: Any) -> Any:
    """The event with an `event_id` (a new uuid4 hex unless it has one), fixed before the
    first attempt so a resent batch is recognised downstream. Not a mapping: as it is,
    for the API to reject with a reason."""
    dump = getattr(event, "model_dump", None)
    if callable(dump):
        event = dump(mode="json")
    if isinstance(event, Mapping) and not event.get("event_id"):
        return {**event, "event_id": uuid.uuid4().hex}
    return event


def batches(events: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """The events in lists of `size`, as given (`send_batch` adds the ids)."""
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    if isinstance(events, Mapping | str | bytes):
        raise TypeError("send_events takes a list (or any iterable) of events, not one event")
    batch: list[Any] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def events_call(batch: list[Any]) -> Call:
    return Call("POST", "/v1/events", {"events": batch})


def decide_call(
    user_id: str,
    k: int,
    surface: str | None,
    context: Mapping[str, Any] | None,
    exclude: Iterable[str] | None,
) -> Call:
    body: dict[str, Any] = {"user_id": user_id, "k": k}
    if surface is not None:
        body["surface"] = surface
    if context:
        body["context"] = dict(context)
    if exclude:
        body["exclude"] = list(exclude)
    return Call("POST", "/v1/decide", body)


def feedback_call(
    decision_id: str,
    user_id: str,
    outcome: str,
    action_id: str | None,
    item_id: str | None,
    ts: datetime | str | None,
    value: float | None,
) -> Call:
    body: dict[str, Any] = {"decision_id": decision_id, "user_id": user_id, "outcome": outcome}
    extra = {"action_id": action_id, "item_id": item_id, "ts": ts, "value": value}
    body.update({k: v for k, v in extra.items() if v is not None})
    # No id to deduplicate on: retried only when it surely did not arrive (retry.py).
    return Call("POST", "/v1/feedback", body, idempotent=False)


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json() if response.content else None
    except ValueError:
        return None


def error_of(response: httpx.Response) -> ApiError:
    body = body_of(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    text = str(detail) if detail else response.text.strip().replace("\n", " ")[:300]
    extra = body.get("extra") if isinstance(body, dict) else None
    if detail and extra:  # Litestar names the offending field here
        text = f"{text}: {json.dumps(extra)[:300]}"
    return ApiError(response.status_code, text or response.reason_phrase, body)


def answer(call: Call, response: httpx.Response) -> Any:
    """The JSON body of a successful answer; None for an allowed 404; else ApiError."""
    if call.missing_ok and response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise error_of(response)
    return body_of(response)


def events_answer(response: httpx.Response) -> dict[str, Any] | None:
    """The `EventsOut` body of a 202 or 422 (no event valid), else None."""
    body = body_of(response)
    if response.status_code in (202, 422) and isinstance(body, dict) and "accepted" in body:
        return body
    return None


# TODO(features-many): when `POST /v1/features` (many entities, a chosen feature list)
# lands in serving/, add `features_many(entity_ids, features)` to both clients as a
# `Call("POST", "/v1/features", {...})` here, with its typed result in results.py.
