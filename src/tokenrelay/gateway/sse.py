"""Server-sent events: a job's entries as `id:`/`event:`/`data:` frames, with transport hygiene.

Each stream entry is one event: `id:` its entry id (what `Last-Event-ID` resumes after),
`event:` its kind, `data:` its fields as JSON. The response begins with a comment at once,
so that headers and the first bytes flush through proxies; a `: ping` comment follows
every ping interval without entries; nothing is compressed or cached (`Cache-Control:
no-store`, `X-Accel-Buffering: no` for nginx). A send that does not complete within the send
timeout (a client that stopped reading, a half-open connection) drops the client. Besides
the entries, the gateway sends events of its own:

- `reconnect` (`{"reason": "lagged" | "shutdown", "after": ID}`): the stream closes; reconnect
  (EventSource does, after `retry:`) with Last-Event-ID to go on.
- `trimmed` (`{"after": ID, "oldest": ID, "message": ...}`): the cursor is older than what
  Redis still holds; the stream goes on from the oldest entry it has.
- `failure` (`{"error_type": ..., "message": ...}`): the stream cannot go on (it expired,
  broke the protocol, or Redis stayed away past the outage limit); the stream closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict
from typing import Any

import structlog
from starlette.types import Receive, Scope, Send

from tokenrelay.errors import ReaderLaggedError, RedisUnavailableError, TokenRelayError
from tokenrelay.gateway.responses import COMMON_HEADERS
from tokenrelay.stream.protocol import Record

log = structlog.get_logger()

#: Milliseconds a client waits before it reconnects (the `retry:` field).
RETRY_MS = 1000

#: The first bytes of every event stream.
OPENING = f": tokenrelay\nretry: {RETRY_MS}\n\n".encode()
PING = b": ping\n\n"

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"x-accel-buffering", b"no"),
    *((k.lower().encode(), v.encode()) for k, v in COMMON_HEADERS.items()),
]

_FRAME_CACHE = 16_384


def event(kind: str, data: Any, entry_id: str | None = None) -> bytes:
    """One event's frame (the JSON holds no newline, so `data:` is one line)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"id: {entry_id}\n" if entry_id is not None else ""
    return f"{head}event: {kind}\ndata: {payload}\n\n".encode()


class Frames:
    """Each record's frame, made once however many clients send it (a bounded cache)."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()

    def __call__(self, key: str, record: Record) -> bytes:
        entry = record.entry
        slot = (key, record.id, entry.kind.value)
        frame = self._cache.get(slot)
        if frame is None:
            data = {"kind": entry.kind.value, **asdict(entry)}
            frame = self._cache[slot] = event(entry.kind.value, data, record.id)
            if len(self._cache) > _FRAME_CACHE:
                self._cache.popitem(last=False)
        return frame


class _SendTimeout(Exception):
    """A send did not complete in time: the client stopped reading."""


class EventStream:
    """An ASGI response that sends batches of records as events until the stream ends."""

    def __init__(
        self,
        key: str,
        batches: AsyncGenerator[list[Record], None],
        *,
        frames: Frames,
        send_timeout: float,
        stopping: asyncio.Event,
        prelude: bytes = b"",
        after: str | None = None,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.key = key
        self.batches = batches
        self.frames = frames
        self.send_timeout = send_timeout
        self.stopping = stopping
        self.prelude = prelude
        self.on_close = on_close
        self.last = after  # the id of the last entry sent (or the one the stream began after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = {"type": "http.response.start", "status": 200, "headers": HEADERS}
            await self._send(send, start)
            await self._body(send, OPENING + self.prelude)
            await self._run(receive, send)
        except _SendTimeout:
            log.info("gateway.client_dropped", stream=self.key, reason="send timeout")
        finally:
            self.on_close()

    async def _run(self, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_disconnected(receive))
        stop = asyncio.create_task(self.stopping.wait())
        tasks = {pump, gone, stop}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this request is cancelled: no task outlives it
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if pump in done:
            pump.result()  # a send timeout goes up from here
        elif stop in done:  # the gateway is shutting down: go on elsewhere, or later
            await self._end(send, event("reconnect", {"reason": "shutdown", "after": self.last}))

    async def _pump(self, send: Send) -> None:
        try:
            async for batch in self.batches:
                if not batch:
                    await self._body(send, PING)
                    continue
                await self._body(send, b"".join(self.frames(self.key, r) for r in batch))
                self.last = batch[-1].id
        except ReaderLaggedError as exc:
            log.info("gateway.client_lagged", stream=self.key, after=exc.last_id)
            await self._end(send, event("reconnect", {"reason": "lagged", "after": exc.last_id}))
            return
        except RedisUnavailableError as exc:  # the detail (where Redis is) is for the log
            log.warning("gateway.stream_failed", stream=self.key, error=str(exc))
            message = "the gateway lost its Redis for longer than it waits; reconnect later"
            failure = {"error_type": type(exc).__name__, "message": message}
            await self._end(send, event("failure", failure))
            return
        except TokenRelayError as exc:
            failure = {"error_type": type(exc).__name__, "message": str(exc)}
            await self._end(send, event("failure", failure))
            return
        except _SendTimeout:
            raise
        except Exception:  # a bug or a Redis reply we did not expect: said, not cut short
            log.exception("gateway.stream_failed", stream=self.key)
            message = "the gateway could not go on reading this stream (see its log)"
            await self._end(
                send, event("failure", {"error_type": "GatewayError", "message": message})
            )
            return
        finally:
            with contextlib.suppress(Exception):
                await self.batches.aclose()
        await self._end(send, b"")

    async def _end(self, send: Send, last: bytes) -> None:
        await self._body(send, last, more=False)

    async def _body(self, send: Send, body: bytes, *, more: bool = True) -> None:
        await self._send(send, {"type": "http.response.body", "body": body, "more_body": more})

    async def _send(self, send: Send, message: Any) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise _SendTimeout from None


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
