"""The shared reader: one Redis read for every stream that any number of followers watch.

A process that follows many streams (the gateway, an `AsyncRelay`) keeps one `StreamHub`.
Its one task reads every watched stream with a single multi-key `XREAD BLOCK`, on a
connection of its own, and pushes what it reads to each stream's subscriptions (small
bounded queues, `Subscription`). Redis serves one blocked read per process however many
followers there are, so the commands per token do not grow with them.

When a stream joins the watched set, the blocked read is cut short (`BlockedRead`, with
`CLIENT UNBLOCK`), so that the next read includes it at once. A stream is dropped from
the set once its terminal entry is read, or when its last follower leaves; one that vanished
(expired, deleted), checked once it has been idle for IDLE_CHECK seconds, ends its
subscriptions with StreamExpiredError. A Redis outage is ridden out (`tokenrelay.outage`):
the reader reconnects with backoff and jitter and reads on from each stream's last id, so no
entry is missed or doubled; past the outage limit every subscription ends with
RedisUnavailableError. How a follower joins without a gap is `tokenrelay.stream.follower`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis import asyncio as aioredis

from tokenrelay.errors import (
    ProtocolError,
    RedisUnavailableError,
    StreamExpiredError,
    TokenRelayError,
)
from tokenrelay.outage import Outage, aretry, backoff, is_down
from tokenrelay.stream import keys
from tokenrelay.stream.blocked_read import BlockedRead
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import is_terminal, text
from tokenrelay.stream.reader import BEGINNING, is_capped, raw_records
from tokenrelay.stream.subscription import Subscription

log = structlog.get_logger()

#: Seconds after its last entry (or check) that a watched stream is checked to still exist.
IDLE_CHECK = 5.0

#: Seconds `close` waits for the reader to stop by itself before it cancels it.
_CLOSE_WAIT = 1.0


class _Watch:
    """One watched stream: where the hub has read it to, and who follows it."""

    __slots__ = ("alive_keys", "capped", "checked_at", "cursor", "key", "ready", "subscribers")

    def __init__(self, key: str, alive_keys: tuple[str, ...]) -> None:
        self.key = key
        self.alive_keys = alive_keys
        self.cursor: str | None = None  # set once the stream's newest id is known
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribers: set[Subscription] = set()
        self.checked_at = time.monotonic()
        self.capped: asyncio.Future[bool] | None = None  # its length cap, once it has begun


class StreamHub:
    """Reads every watched stream with one blocked XREAD and fans the entries out.

    `client` is an asyncio client (`connection.async_client_for`): the hub takes one of its
    pool's connections for the blocked read and uses the pool for everything else. Start it
    with `start()` (or `async with`) inside the event loop that will use it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        outage_limit: float,
        queue_size: int = 256,
        name: str = "tokenrelay-hub",
    ) -> None:
        self.client = client
        self.queue_size = queue_size
        self.name = name
        self.outage = Outage(outage_limit, who=name)
        self._blocked = BlockedRead(client, name)
        self._watches: dict[str, _Watch] = {}
        self._wake: asyncio.Future[None] | None = None  # set when a stream joins the set
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def watched(self) -> int:
        """How many streams are being read."""
        return len(self._watches)

    def read_to(self, job_id: str) -> str | None:
        """The id of the last entry the hub has read from the job's stream (None: not read)."""
        watch = self._watches.get(keys.token_stream(job_id))
        return None if watch is None else watch.cursor

    @property
    def reads(self) -> int:
        """XREAD calls sent so far (for tests and benchmarks)."""
        return self._blocked.reads

    def start(self) -> None:
        """Start the reader task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stop reading, give the connection back, and end every subscription."""
        self._closing = True
        self._signal()
        await self._blocked.interrupt()  # end the read in flight, rather than cut it off
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task], timeout=_CLOSE_WAIT)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._blocked.close()
        for watch in list(self._watches.values()):
            self._end(watch, TokenRelayError("the shared reader was closed"))

    async def __aenter__(self) -> StreamHub:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def subscribe(self, job_id: str, alive_keys: Sequence[str] = ()) -> Subscription:
        """A new subscription to the job's stream: every entry the hub reads from now on.

        Entries the stream already holds are not in it: a follower replays them from Redis
        after subscribing (`tokenrelay.stream.follower`).
        """
        key = keys.token_stream(job_id)
        while True:
            watch = self._watches.get(key)
            if watch is None:
                watch = self._watches[key] = _Watch(key, (key, *alive_keys))
                await self._begin(watch)
            else:
                await asyncio.shield(watch.ready)
            if self._watches.get(key) is watch:  # not ended or abandoned meanwhile
                break
        subscription = Subscription(key, self.queue_size)
        watch.subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop pushing to the subscription; a stream nobody follows is no longer read."""
        watch = self._watches.get(subscription.key)
        if watch is None:
            return
        watch.subscribers.discard(subscription)
        if not watch.subscribers and watch.cursor is not None:
            del self._watches[watch.key]

    async def capped(self, job_id: str) -> bool:
        """Whether the job's stream, which has begun, has a length cap: asked of Redis once per
        watched stream, however many followers ask at once."""
        watch = self._watches.get(keys.token_stream(job_id))
        if watch is None:
            return await self._ask_capped(job_id)
        if watch.capped is None:
            watch.capped = asyncio.ensure_future(self._ask_capped(job_id))
        asked = watch.capped
        try:
            return await asyncio.shield(asked)
        except BaseException:
            if asked.done() and (asked.cancelled() or asked.exception() is not None):
                watch.capped = None  # ask again next time
            raise

    async def _ask_capped(self, job_id: str) -> bool:
        state = keys.stream_state(job_id)
        maxlen = await aretry(self.outage, lambda: self.client.hget(state, StateField.MAXLEN.value))
        return is_capped(maxlen)

    async def _begin(self, watch: _Watch) -> None:
        """Start reading a stream after its newest entry (its followers replay what is older)."""
        try:
            newest: Any = await aretry(
                self.outage, lambda: self.client.xrevrange(watch.key, count=1)
            )
            watch.cursor = text(newest[0][0]) if newest else BEGINNING
        except BaseException:
            if self._watches.get(watch.key) is watch:
                del self._watches[watch.key]
            raise
        finally:
            watch.ready.set_result(None)  # the ones waiting on it see whether it is still there
        self._signal()
        self._blocked.changed()

    def _signal(self) -> None:
        """Wake the reader if it waits for a stream to read."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _outage(self, exc: Exception, tries: int) -> None:
        """Redis is away: reconnect after a backoff; past the outage limit, end every follower."""
        await self._blocked.disconnect()
        try:
            self.outage.failed(exc)
        except RedisUnavailableError as gone:
            for watch in list(self._watches.values()):
                self._end(watch, gone)
        await asyncio.sleep(backoff(tries))

    async def _run(self) -> None:
        tries = 0
        while not self._closing:
            try:
                watches = [w for w in self._watches.values() if w.cursor is not None]
                if watches:
                    self._dispatch(await self._read(watches))
                else:
                    # asyncio.wait, not asyncio.timeout: on Python 3.11 a timeout that expires
                    # as close() cancels the task can turn the cancellation into a TimeoutError.
                    self._wake = asyncio.get_running_loop().create_future()
                    await asyncio.wait([self._wake], timeout=IDLE_CHECK)
                await self._check_idle()
            except Exception as exc:
                if is_down(exc):
                    await self._outage(exc, tries)
                    tries += 1
                    continue
                # A bug must not leave followers waiting forever.
                log.exception("hub.failed", hub=self.name)
                for watch in list(self._watches.values()):
                    self._end(watch, exc)
                await asyncio.sleep(1.0)
                continue
            tries = 0
            self.outage.ok()

    async def _read(self, watches: list[_Watch]) -> Any:
        """One XREAD of every watched stream after its cursor."""
        return await self._blocked.xread(
            [w.key for w in watches], [w.cursor or BEGINNING for w in watches]
        )

    def _dispatch(self, reply: Any) -> None:
        """Push each stream's new entries to its subscriptions; drop streams that ended."""
        for raw_key, raw_entries in reply or []:
            watch = self._watches.get(text(raw_key))
            if watch is None:
                continue
            try:
                batch = raw_records(raw_entries)
            except ProtocolError as exc:
                self._end(watch, exc)
                continue
            if not batch:
                continue
            watch.cursor = batch[-1].id
            watch.checked_at = time.monotonic()
            for subscription in watch.subscribers:
                subscription.push(batch)
            if any(is_terminal(record.entry) for record in batch):
                del self._watches[watch.key]

    async def _check_idle(self) -> None:
        """End the subscriptions of idle streams that no longer exist (nor their job)."""
        now = time.monotonic()
        idle = [
            w
            for w in self._watches.values()
            if w.cursor is not None and now - w.checked_at >= IDLE_CHECK
        ]
        if not idle:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for watch in idle:
                pipe.exists(*watch.alive_keys)
            found = await pipe.execute()
        for watch, exists in zip(idle, found, strict=True):
            watch.checked_at = now
            if not exists and self._watches.get(watch.key) is watch:
                gone = StreamExpiredError(f"{watch.key} is gone: it expired or was deleted")
                self._end(watch, gone)

    def _end(self, watch: _Watch, exc: BaseException) -> None:
        if self._watches.get(watch.key) is watch:
            del self._watches[watch.key]
        for subscription in watch.subscribers:
            subscription.fail(exc)
