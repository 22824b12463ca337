"""Many light SSE clients in one asyncio process, for the gateway benchmark.

Each client is a raw socket protocol: it sends one GET, de-chunks the response (the gateway
sends whole events in each chunk) and, for every event, notes how long after its entry was
written (the entry id's milliseconds: Redis's clock, this machine's) the client had it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from functools import partial


@dataclass
class Client:
    """What one client received."""

    text: list[str] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    transport: asyncio.Transport | None = None

    def close(self) -> None:
        """Hang up."""
        if self.transport is not None:
            self.transport.close()


class _Protocol(asyncio.Protocol):
    def __init__(self, request: bytes, client: Client) -> None:
        self.request = request
        self.client = client
        self.buffer = b""
        self.headers_done = False
        self.pending = b""  # event text not yet ended by a blank line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000
        self.buffer += data
        if not self.headers_done:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            self.headers_done, self.buffer = True, rest
            self.client.opened.set()
        while True:
            size_line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                return
            size = int(size_line, 16)
            if size == 0:
                self.client.ended.set()
                return
            if len(rest) < size + 2:
                return
            self.pending += rest[:size]
            self.buffer = rest[size + 2 :]
            self._events(now_ms)

    def _events(self, now_ms: float) -> None:
        *complete, self.pending = self.pending.split(b"\n\n")
        for frame in complete:
            fields = dict(line.split(b": ", 1) for line in frame.split(b"\n") if b": " in line)
            kind = fields.get(b"event", b"").decode()
            if not kind:
                continue  # a comment
            self.client.kinds.append(kind)
            if kind == "token":
                entry_ms = int(fields[b"id"].split(b"-")[0])
                self.client.delays_ms.append(now_ms - entry_ms)
                self.client.text.append(json.loads(fields[b"data"])["text"])
            elif kind in ("end", "error"):
                self.client.ended.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.ended.set()


async def open_clients(host: str, port: int, path: str, count: int) -> list[Client]:
    """`count` clients of one event stream, each connected and past its headers."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    loop = asyncio.get_running_loop()
    clients = [Client() for _ in range(count)]
    for client in clients:
        await loop.create_connection(partial(_Protocol, request.encode(), client), host, port)
    await asyncio.wait_for(asyncio.gather(*(c.opened.wait() for c in clients)), 120)
    return clients
