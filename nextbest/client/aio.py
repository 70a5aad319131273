"""`nextbest.AsyncClient`: `Client` for asyncio (same calls, awaited)."""

import asyncio
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


class AsyncClient:
    """See `nextbest.Client`; use `async with AsyncClient(...) as nb:`."""

    def __init__(
        self,
        base_url: str = p.DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_key = api_key
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "AsyncClient":
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.api_url, api_key=key, **kwargs)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: p.Call) -> tuple[httpx.Response, int]:
        attempt = 0
        content = p.encode(call.body) if call.body is not None else None
        while True:
            headers = {"content-type": "application/json", **p.auth_headers(self.api_key)}
            try:
                response = await self._http.request(
                    call.method, call.path, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                if attempt < self.retry.retries and self.retry.retryable(
                    exc, idempotent=call.idempotent
                ):
                    await asyncio.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise ApiUnreachable(
                    f"{call.method} {call.path}: {exc!r} (after {attempt} retries)", attempt
                ) from exc
            if attempt < self.retry.retries and self.retry.retryable(
                response, idempotent=call.idempotent
            ):
                await asyncio.sleep(self.retry.delay(attempt, response))
                attempt += 1
                continue
            return response, attempt

    async def _call(self, call: p.Call) -> Any:
        return p.answer(call, (await self._send(call))[0])

    async def send_events(
        self, events: Iterable[Any], *, batch_size: int = p.BATCH_SIZE
    ) -> SendResult:
        result = SendResult()
        for batch in p.batches(events, batch_size):
            await self.send_batch(batch, result)
        return result

    async def send_batch(self, batch: list[Any], result: SendResult) -> None:
        batch = [p.with_event_id(e) for e in batch]
        start = result.sent
        result.sent += len(batch)
        try:
            response, retries = await self._send(p.events_call(batch))
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

    async def decide(
        self,
        user_id: str,
        *,
        k: int = 10,
        surface: str | None = None,
        context: Mapping[str, Any] | None = None,
        exclude: Iterable[str] | None = None,
    ) -> Decision:
        call = p.decide_call(user_id, k, surface, context, exclude)
        return Decision.from_json(await self._call(call))

    async def feedback(
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
        return FeedbackResult.from_json(await self._call(call))

    async def features(self, user_id: str) -> UserFeatures | None:
        call = p.Call("GET", p.user_path(user_id, "/features"), missing_ok=True)
        body = await self._call(call)
        return None if body is None else UserFeatures.from_json(body)

    async def erase(self, user_id: str) -> Erasure:
        return Erasure.from_json(await self._call(p.Call("DELETE", p.user_path(user_id))))

    async def erasure_status(self, user_id: str) -> Erasure | None:
        call = p.Call("GET", p.user_path(user_id, "/erasure"), missing_ok=True)
        body = await self._call(call)
        return None if body is None else Erasure.from_json(body)
