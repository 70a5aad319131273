"""`nextbest.Client`: the HTTP API from Python, with retries and typed answers.

from nextbest import Client

with Client("http://127.0.0.1:8000") as nb:      # key: api_key= or NEXTBEST_API_KEY
    nb.send_events([{"type": "view", "user_id": "u1", "item_id": "i1", "ts": now}])
    decision = nb.decide("u1", k=5)
    nb.feedback(decision.decision_id, "u1", "click", item_id=decision.actions[0].item_id)
"""

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import httpx

from nextbest.client import protocol as p
from nextbest.client.results import (
    Decision,
    Erasure,
    FailedBatch,
    FeedbackResult,
    Outcome,
    SendResult,
    UserFeatures,
)
from nextbest.client.retry import ApiUnreachable, RetryPolicy


class Client:
    """One connection pool to the API; thread-safe like the `httpx.Client` under it.

    `api_key` None reads NEXTBEST_API_KEY at each request. `timeout` is seconds per
    attempt (or an `httpx.Timeout`); `retry` says how often and how long to wait."""

    def __init__(
        self,
        base_url: str = p.DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_key = api_key
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "Client":
        """A client for the API `Settings` describe (`api_url`, `api_key`)."""
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.api_url, api_key=key, **kwargs)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: p.Call) -> tuple[httpx.Response, int]:
        """The final response and how many retries it took; ApiUnreachable if none."""
        attempt = 0
        content = p.encode(call.body) if call.body is not None else None
        while True:
            headers = {"content-type": "application/json", **p.auth_headers(self.api_key)}
            try:
                response = self._http.request(
                    call.method, call.path, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                if attempt < self.retry.retries and self.retry.retryable(
                    exc, idempotent=call.idempotent
                ):
                    time.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise ApiUnreachable(
                    f"{call.method} {call.path}: {exc!r} (after {attempt} retries)", attempt
                ) from exc
            if attempt < self.retry.retries and self.retry.retryable(
                response, idempotent=call.idempotent
            ):
                time.sleep(self.retry.delay(attempt, response))
                attempt += 1
                continue
            return response, attempt

    def _call(self, call: p.Call) -> Any:
        return p.answer(call, self._send(call)[0])

    def send_events(self, events: Iterable[Any], *, batch_size: int = p.BATCH_SIZE) -> SendResult:
        """POST events in batches; never raises for a batch, says what happened to each
        event instead (`SendResult.ok`). Events without an `event_id` get one before
        the first attempt, so a batch resent after a lost 202 is stored once."""
        result = SendResult()
        for batch in p.batches(events, batch_size):
            self.send_batch(batch, result)
        return result

    def send_batch(self, batch: list[Any], result: SendResult) -> None:
        """Send one batch as one request (ids added where missing), folded into `result`."""
        batch = [p.with_event_id(e) for e in batch]
        start = result.sent
        result.sent += len(batch)
        try:
            response, retries = self._send(p.events_call(batch))
        except ApiUnreachable as exc:
            result.retries += exc.retries
            result.failed.append(FailedBatch(start, len(batch), str(exc)))
            return
        result.retries += retries
        body = p.events_answer(response)
        if body is None:
            error = p.error_of(response)
            result.failed.append(FailedBatch(start, len(batch), str(error), error.status_code))
        else:
            result.add_body(body, start)

    def decide(
        self,
        user_id: str,
        *,
        k: int = 10,
        surface: str | None = None,
        context: Mapping[str, Any] | None = None,
        exclude: Iterable[str] | None = None,
    ) -> Decision:
        """The next-best actions for a user (`anon:<anonymous_id>` for a visitor)."""
        return Decision.from_json(self._call(p.decide_call(user_id, k, surface, context, exclude)))

    def feedback(
        self,
        decision_id: str,
        user_id: str,
        outcome: Outcome,
        *,
        action_id: str | None = None,
        item_id: str | None = None,
        ts: datetime | str | None = None,
        value: float | None = None,
    ) -> FeedbackResult:
        call = p.feedback_call(decision_id, user_id, outcome, action_id, item_id, ts, value)
        return FeedbackResult.from_json(self._call(call))

    def features(self, user_id: str) -> UserFeatures | None:
        """The user's online features and session state; None if the store has none."""
        body = self._call(p.Call("GET", p.user_path(user_id, "/features"), missing_ok=True))
        return None if body is None else UserFeatures.from_json(body)

    def erase(self, user_id: str) -> Erasure:
        """Start erasing a user everywhere (needs an admin key); poll `erasure_status`."""
        return Erasure.from_json(self._call(p.Call("DELETE", p.user_path(user_id))))

    def erasure_status(self, user_id: str) -> Erasure | None:
        """The user's latest erasure job, store by store; None if there is none."""
        call = p.Call("GET", p.user_path(user_id, "/erasure"), missing_ok=True)
        body = self._call(call)
        return None if body is None else Erasure.from_json(body)
