"""Request ids and the opt-in access log.

Every request gets an id: the client's `X-Request-ID` when it is a sane token (at most
128 of `A-Za-z0-9._:-`, so a header cannot forge log fields), else 16 random hex
digits. The id is in the log context of every line logged while the request is handled
(`nextbest.logs.bind_request`) and echoed in the response's `X-Request-ID`.

The access line names the route's path template (`/v1/users/{user_id}`), not the
path: a log file must not keep the ids an erasure removes from every store.

The header and the access line are added by a `before_send` hook, not by the
middleware's send wrapper: responses to exceptions raised by other middleware (401,
403, 413, 429) are sent by Litestar's app-level exception handler, outside every user
middleware, and `before_send` sees those too. The middleware leaves the id and the
start time in the ASGI scope for the hook.
"""

import os
import re
import time
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from nextbest.logs import bind_request, get_logger, request_fields, reset_request

HEADER = "x-request-id"
_HEADER_BYTES = HEADER.encode()
_SCOPE_KEY = "nextbest.request"
_SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

access = get_logger("nextbest.access")


def new_request_id() -> str:
    return os.urandom(8).hex()


def incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER_BYTES:
            text = value.decode("latin-1")
            return text if _SANE.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    """Outermost user middleware: the request's id and log context."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_id(scope) or new_request_id()
        token = bind_request(request_id=request_id)
        fields = request_fields()
        scope[_SCOPE_KEY] = (fields, time.perf_counter())  # type: ignore[literal-required]
        try:
            await self.app(scope, receive, send)
        finally:
            reset_request(token)


def response_hook(*, access_log: bool) -> Any:
    """The `before_send` hook: echo the id; with `access_log`, one line per response."""

    async def stamp(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        held = scope.get(_SCOPE_KEY)  # type: ignore[misc]
        if held is None:  # not routed (404, 405): no middleware ran
            fields, started = {"request_id": new_request_id()}, None
            scope[_SCOPE_KEY] = (fields, time.perf_counter())  # type: ignore[literal-required]
        else:
            fields, started = held
        MutableScopeHeaders.from_message(message)[HEADER] = fields["request_id"]
        if access_log:
            ms = None if started is None else round((time.perf_counter() - started) * 1000, 3)
            access.info(
                "request",
                method=scope.get("method"),
                path=scope.get("path_template") or "unmatched",  # never a user id
                status=message["status"],
                duration_ms=ms,
                **fields,
            )

    return stamp
