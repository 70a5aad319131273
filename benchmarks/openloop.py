"""Open-loop HTTP load primitives: a minimal keep-alive HTTP/1.1 client on asyncio and
a fixed-arrival-rate driver that measures latency from each request's due time.

Used by benchmarks/decide.py. Hand-written instead of httpx because the generator
shares a 2-core machine with the server: every microsecond it spends is taken from
the system under test.
"""

import asyncio
import sys
from dataclasses import dataclass, field

import numpy as np


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        start = header.lower().find(b"content-length:")
        length = int(header[start + 15 : header.index(b"\r\n", start)]) if start >= 0 else 0
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Pool:
    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[Conn] = []
        self.opened = 0
        self.freed = asyncio.Event()

    async def acquire(self) -> Conn:
        while True:
            if self.idle:
                return self.idle.pop()
            if self.opened < self.limit:
                self.opened += 1
                return await Conn.open(self.host, self.port)
            self.freed.clear()
            await self.freed.wait()

    async def warm(self, n: int) -> None:
        """Open n keep-alive connections before the clock starts, as a client's pool
        would already hold them."""
        conns = [await self.acquire() for _ in range(min(n, self.limit))]
        for c in conns:
            self.release(c)

    def release(self, conn: Conn) -> None:
        self.idle.append(conn)
        self.freed.set()


def head(path: str, key: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {key}\r\nContent-Length: "
    ).encode()


@dataclass
class Stream:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    degraded: dict[str, int] = field(default_factory=dict)
    """First `degraded` note's reason (the text before ':') -> answers carrying one."""
    fallback: int = 0
    """Answers served from `fallback` or with a non-empty `degraded` list."""


async def open_loop(
    pool: Pool,
    rate: float,
    seconds: float,
    make_body,
    head: bytes,
    out: Stream,
    *,
    track_served: bool = False,
) -> float:
    """Send at `rate`/s for `seconds`; returns the wall time until the last reply."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    n = int(rate * seconds)
    tasks = []

    async def one(due: float, body: bytes) -> None:
        conn = await pool.acquire()
        try:
            try:
                status, reply = await conn.request(head, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: retry once on a new
                # one, as HTTP clients do; the latency still counts from `due`.
                conn.close()
                conn = await Conn.open(pool.host, pool.port)
                status, reply = await conn.request(head, body)
        except Exception as exc:
            out.errors += 1
            out.statuses[-1] = out.statuses.get(-1, 0) + 1
            if out.errors <= 3:
                print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            pool.opened -= 1
            pool.freed.set()
            return
        pool.release(conn)
        out.latencies.append(loop.time() - due)
        out.statuses[status] = out.statuses.get(status, 0) + 1
        if status >= 500:
            out.errors += 1
        if track_served and status == 200:
            count_served(out, reply)

    for i in range(n):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, make_body())))
    await asyncio.gather(*tasks)
    return loop.time() - start


def count_served(out: Stream, reply: bytes) -> None:
    """Tally a /v1/decide answer's origin and its first degraded reason (byte scans:
    parsing every reply would take CPU from the server under test)."""
    origin = ""
    for served in (b"realtime", b"cached", b"fallback"):
        if b'"served_from":"' + served in reply:
            origin = served.decode()
            out.served[origin] = out.served.get(origin, 0) + 1
            break
    at = reply.find(b'"degraded":[')
    note = b""
    if at >= 0 and reply[at + 12 : at + 13] == b'"':
        end = reply.find(b'"', at + 13)
        note = reply[at + 13 : end].split(b":", 1)[0][:40]
        reason = note.decode(errors="replace")
        out.degraded[reason] = out.degraded.get(reason, 0) + 1
    if origin == "fallback" or note:
        out.fallback += 1


def summary(name: str, s: Stream, offered: float, wall: float, count_unit: int = 1) -> dict:
    lat = np.asarray(s.latencies) * 1000
    done = len(s.latencies)
    row = {
        "stream": name,
        "offered/s": round(offered, 1),
        "achieved/s": round(done * count_unit / wall, 1) if wall > 0 else 0.0,
        "p50 ms": round(float(np.percentile(lat, 50)), 2) if done else None,
        "p95 ms": round(float(np.percentile(lat, 95)), 2) if done else None,
        "p99 ms": round(float(np.percentile(lat, 99)), 2) if done else None,
        "max ms": round(float(lat.max()), 2) if done else None,
        "errors": s.errors,
        "statuses": s.statuses,
    }
    if s.served:
        row["served_from"] = s.served
        row["fallback %"] = round(100 * s.fallback / max(1, sum(s.served.values())), 1)
        row["degraded"] = s.degraded
    return row
