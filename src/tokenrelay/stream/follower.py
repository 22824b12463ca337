"""Following a stream through the shared reader: subscribe, replay from Redis, then go live.

`follow` gives asyncio code what `read_stream` gives threads (the same entries, the same
integrity checks and `gap` records, the same deadlines and errors) without holding a Redis
connection while it waits. It joins without a gap: it subscribes to the hub first, so that
every entry the hub reads from then on is queued for it; then it replays what Redis holds
after its cursor with XRANGE; then it takes the queued live entries, dropping the ones the
replay already gave. If its queue overflows (the follower fell too far behind), it goes back
to Redis for what it missed; with `resume_on_lag=False` an overflow while it follows live
raises ReaderLaggedError instead, so that its caller (the gateway) can tell its client to
reconnect (one during a replay only makes it replay further).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tokenrelay.errors import JobNotFoundError, ReaderLaggedError, StreamTimeoutError
from tokenrelay.outage import aretry
from tokenrelay.stream import keys
from tokenrelay.stream.hub import StreamHub
from tokenrelay.stream.integrity import StreamCheck
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import Record, is_terminal, records, text
from tokenrelay.stream.reader import BEGINNING, PAGE, id_before, id_order
from tokenrelay.stream.subscription import Subscription

T = TypeVar("T")

#: Seconds a follower waits for live entries before it looks again (and yields a heartbeat).
WAIT = 30.0


class _Reader:
    """One follower's Redis calls, each within its deadline and ridden across outages."""

    def __init__(
        self, hub: StreamHub, job_id: str, alive_keys: Sequence[str], timeout: float | None
    ) -> None:
        self.hub = hub
        self.client = hub.client
        self.job_id = job_id
        self.key = keys.token_stream(job_id)
        self.state_key = keys.stream_state(job_id)
        self.alive_keys = [self.key, *alive_keys]
        loop = asyncio.get_running_loop()
        self.deadline = None if timeout is None else loop.time() + timeout

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise StreamTimeoutError(f"{self.key} did not end in time")
        return left

    async def within(self, awaitable: Awaitable[T]) -> T:
        """`await awaitable`, or StreamTimeoutError at the deadline."""
        try:
            async with asyncio.timeout(self.remaining()):
                return await awaitable
        except TimeoutError:
            raise StreamTimeoutError(f"{self.key} did not end in time") from None

    async def call(self, command: Callable[[], Awaitable[T]]) -> T:
        """A Redis command, sent again while Redis is away (up to the outage limit)."""
        return await self.within(aretry(self.hub.outage, command))

    async def newest(self) -> str:
        """Where a live follower starts (as `read_stream` does: a terminal entry is still given)."""
        newest: Any = await self.call(lambda: self.client.xrevrange(self.key, count=1))
        if not newest:
            return BEGINNING
        [record] = records(newest)
        return id_before(record.id) if is_terminal(record.entry) else record.id

    async def ended_before(self, last: str) -> bool:
        end: Any = await self.call(lambda: self.client.hget(self.state_key, StateField.END.value))
        return end is not None and id_order(last) >= id_order(text(end))

    async def check(self, after: str) -> StreamCheck:
        """The stream's integrity check, once it has begun (its state says if it is capped)."""
        capped = await self.within(self.hub.capped(self.job_id))
        return StreamCheck(self.key, from_start=after == BEGINNING, capped=capped)

    async def page(self, last: str) -> list[Record]:
        raw: Any = await self.call(lambda: self.client.xrange(self.key, min=f"({last}", count=PAGE))
        return records(raw)

    async def take(self, subscription: Subscription, wait: float) -> list[Record]:
        left = self.remaining()
        return await subscription.take(wait if left is None else min(wait, left))


async def _opening(reader: _Reader, job_id: str, after: str, live: bool) -> str | None:
    if not await reader.call(lambda: reader.client.exists(*reader.alive_keys)):
        raise JobNotFoundError(f"no job {job_id!r} (it may have expired)")
    if live:
        after = await reader.newest()
    return None if await reader.ended_before(after) else after


async def opening(
    hub: StreamHub,
    job_id: str,
    *,
    after: str = BEGINNING,
    live: bool = False,
    alive_keys: Sequence[str] = (),
    timeout: float | None = None,
) -> str | None:
    """Where a follower of the job starts: the entry id it reads after (`live` resolved), or
    None if the stream ended at or before `after`; JobNotFoundError if neither the stream nor
    any of `alive_keys` exists. Pass the id to `follow(..., opened=True)`."""
    return await _opening(_Reader(hub, job_id, alive_keys, timeout), job_id, after, live)


def _checked(check: StreamCheck, batch: list[Record], last: str) -> tuple[list[Record], bool]:
    """The batch after its checks, with gap records where tokens were trimmed; whether it ended."""
    out = []
    for record in batch:
        gap = check.check(record)
        if gap is not None:
            out.append(Record(last, gap))
        out.append(record)
        last = record.id
        if is_terminal(record.entry):
            return out, True
    return out, False


async def follow(
    hub: StreamHub,
    job_id: str,
    *,
    after: str = BEGINNING,
    live: bool = False,
    timeout: float | None = None,
    alive_keys: Sequence[str] = (),
    heartbeat: float | None = None,
    resume_on_lag: bool = True,
    opened: bool = False,
) -> AsyncGenerator[list[Record], None]:
    """Batches of the job's entries after `after`, until (and with) its terminal entry.

    The arguments and errors are `read_stream`'s. With `heartbeat`, an empty batch comes
    whenever that many seconds pass without an entry (a server sends a keep-alive then).
    `opened` says `after` came from `opening` (checked, and `live` resolved already).
    """
    reader = _Reader(hub, job_id, alive_keys, timeout)
    if not opened:
        start = await _opening(reader, job_id, after, live)
        if start is None:
            return  # resumed at or past the terminal entry: nothing more will come
        after = start
    subscription = await reader.within(hub.subscribe(job_id, alive_keys))
    last, check = after, None
    wait = min(heartbeat or WAIT, WAIT)
    try:
        while True:
            subscription.reset()  # from here on, Redis holds whatever the queue lacks
            while True:
                page = await reader.page(last)
                if page:
                    check = check or await reader.check(after)
                    out, ended = _checked(check, page, last)
                    last = page[-1].id
                    yield out
                    if ended:
                        return
                if len(page) < PAGE:
                    break
            if subscription.overflowed:
                continue  # it overflowed while this follower replayed: replay on from Redis
            while not subscription.overflowed:
                batch = await reader.take(subscription, wait)
                fresh = [r for r in batch if id_order(r.id) > id_order(last)]
                if fresh:
                    check = check or await reader.check(after)
                    out, ended = _checked(check, fresh, last)
                    last = fresh[-1].id
                    yield out
                    if ended:
                        return
                elif not batch and not subscription.overflowed and heartbeat is not None:
                    yield []
            if not resume_on_lag:
                raise ReaderLaggedError(last)
    finally:
        hub.unsubscribe(subscription)
