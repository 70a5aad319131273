"""Refuse hostile request bodies before any JSON decoder sees them.

A body nested thousands of arrays deep, or one array of millions of zeros, costs the
decoder (and then pydantic) far more than its bytes suggest; the first was a 500. This
middleware reads the body of the routes that take one (those naming a key scope, after
authentication), answers 413 past `max_body_bytes` and 400 when
`nextbest.ingest.limits.scan_json` finds the nesting or an array too large, then replays the
bytes to the handler unchanged.
"""

from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import ASGIApp, HTTPRequestEvent, Receive, ReceiveMessage, Scope, Send

from nextbest.ingest.limits import Limits, scan_json
from serving.keys import required_scope

_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodyGuardMiddleware:
    def __init__(self, app: ASGIApp, limits: Limits, max_body_bytes: int) -> None:
        self.app = app
        self.limits = limits
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _WITH_BODY
            or required_scope(scope.get("route_handler")) is None
        ):
            await self.app(scope, receive, send)
            return
        body, tail = await self._read(scope, receive)
        reason = scan_json(
            body, max_depth=self.limits.max_body_depth, max_array=self.limits.max_body_array
        )
        if reason is not None:
            raise ClientException(reason)
        replayed = False

        async def replay() -> ReceiveMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                whole: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": False}
                return whole
            return tail if tail is not None else await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, ReceiveMessage | None]:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise RequestEntityTooLarge(_too_large(self.max_body_bytes))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestEntityTooLarge(_too_large(self.max_body_bytes))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (NEXTBEST_MAX_BODY_BYTES)"
