"""A TCP proxy between a client and the API that injects faults, one per connection.

Armed faults apply to the next new connections in order, then it is a plain pipe:

- `drop_response`: forwards the request, waits for the API's answer (so the request
  was processed: a 202 means the batch is durable), then closes the client's
  connection without relaying it, as a crash or a network cut after the commit would.
- `503` / `429`: answers with that status (`Retry-After: 0`) without forwarding.

Faults are per connection, so a test arms them before a fresh client's first request
(a client reusing a pooled connection would bypass them).
"""

import contextlib
import socket
import threading
from collections import deque
from dataclasses import dataclass, field

CANNED = {
    "503": b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\n",
    "429": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\n",
}


@dataclass
class FaultLog:
    connections: int = 0
    withheld: list[bytes] = field(default_factory=list)
    """Status lines of answers the API sent and the proxy did not relay."""
    canned: list[str] = field(default_factory=list)


def _read_request(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 request with a Content-Length body (what httpx sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _read_status(sock: socket.socket) -> bytes:
    """The upstream answer's status line (arrives once the request was handled)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").rpartition(":")
        self.upstream = (host, int(port))
        self.faults: deque[str] = deque()
        self.log = FaultLog()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def arm(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._thread.join(timeout=10)
        self._listener.close()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)  # close() does not wake a blocked accept()
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                self.log.connections += 1
                fault = self.faults.popleft() if self.faults else None
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault in CANNED:
            with client:
                _read_request(client)
                body = b'{"status_code": %s, "detail": "injected by the test proxy"}' % (
                    fault.encode()
                )
                head = CANNED[fault] + b"content-type: application/json\r\nConnection: close\r\n"
                self.log.canned.append(fault)  # before the answer: the client may read the log
                client.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        if fault == "drop_response":
            with client, upstream:
                upstream.sendall(_read_request(client))
                self.log.withheld.append(_read_status(upstream))
            return
        threads = [
            threading.Thread(target=_pump, args=(client, upstream), daemon=True),
            threading.Thread(target=_pump, args=(upstream, client), daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        upstream.close()
