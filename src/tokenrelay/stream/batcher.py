"""The worker's stream writer: every running job's new tokens, written together, in batches.

A job adds tokens to its `BatchedStream` (`stream.batched`) without any Redis round trip. One
`StreamBatcher`
per worker process writes them: whenever some stream has tokens waiting, it sends one
pipeline holding one APPEND (see `stream.scripts`) per such stream, with all of that stream's
waiting tokens as one entry (`n` tokens). Tokens that arrive while a pipeline is in flight, or
within `MIN_INTERVAL` (5 ms) of the last one, wait for the next: a slow trickle is written at once,
token by token; a fast burst in a few entries. A stream is never in two writes at once, so its
entries land in order.

A pipeline whose connection broke has an unknown outcome for each of its entries; each is
sent again exactly as it was (the append script recognises the writer's own retried `seq`),
before anything newer of its stream. While Redis is away (an outage, a failover), tokens wait
in memory, up to `max_pending` a stream (TOKENRELAY_MAX_HELD_TOKENS; past it,
`BatchedStream.backlogged`: the generation waits for its writes, or, during an outage, ends
its attempt to continue it later), and are written in order when it comes back. Past the
outage limit (TOKENRELAY_REDIS_OUTAGE_LIMIT), the streams still waiting are refused with
RedisUnavailableError, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import RedisUnavailableError
from tokenrelay.outage import Outage, aretry, backoff, down_reply
from tokenrelay.stream import keys, scripts
from tokenrelay.stream.batched import BatchedStream
from tokenrelay.stream.lease_scripts import Claim

log = structlog.get_logger()

#: The most streams one pipeline carries.
MAX_STREAMS_PER_FLUSH = 1_000

#: The least time between two pipelines. A token that comes after a quiet spell is written at
#: once; in a burst, what comes within this time shares one entry a stream, and one pipeline
#: carries every stream's.
MIN_INTERVAL = 0.005


class StreamBatcher:
    """Writes the new tokens of every stream of one process, one pipeline at a time.

    `outage` is the process's record of Redis being away: every write waits for Redis
    through it, up to its limit.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        outage: Outage,
        tokens_per_entry: int = 0,
        max_pending: int = 10_000,
    ) -> None:
        self.client = client
        self.outage = outage
        self.tokens_per_entry = tokens_per_entry  # 0: as many as came
        self.max_pending = max_pending  # tokens a stream may hold unwritten
        self.flushes = 0  # pipelines sent
        self.entries = 0  # token entries written
        self._waiting: dict[BatchedStream, None] = {}  # an ordered set
        self._wake = asyncio.Event()

    def stream(
        self,
        job_id: str,
        *,
        ttl: int,
        events_cap: int = keys.EVENTS_HARD_CAP,
        maxlen: int = 0,
        claim: Claim | None = None,
    ) -> BatchedStream:
        """A stream writer for a job: a new one, or (with `claim`) one taken over."""
        return BatchedStream(
            self, job_id, ttl=ttl, events_cap=events_cap, maxlen=maxlen, claim=claim
        )

    def mark(self, stream: BatchedStream) -> None:
        """Note that `stream` has tokens to write."""
        self._waiting[stream] = None
        self._wake.set()

    async def run(self, script: scripts.Script, script_keys: list[str], args: list[str]) -> Any:
        """Run one script now (a begin, an attempt, a close), loading it if Redis lost it, and
        waiting out an outage up to its limit (every script is safe to send again)."""

        async def call() -> Any:
            try:
                return await self.client.evalsha(script.sha, len(script_keys), *script_keys, *args)
            except NoScriptError:
                return await self.client.eval(script.source, len(script_keys), *script_keys, *args)

        try:
            return await aretry(self.outage, call)
        except ResponseError as exc:
            raise scripts.refusal(str(exc)) from None

    async def serve(self) -> None:
        """Write tokens as they come, until cancelled."""
        tries = 0
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                wait = last + MIN_INTERVAL - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                last = loop.time()
                if await self._flush():
                    tries = 0
                else:  # the connection broke: wait, then send the same entries again
                    await asyncio.sleep(backoff(tries))
                    tries += 1

    async def _flush(self) -> bool:
        """Send one pipeline; False if its connection broke (its entries are to be resent)."""
        batch: list[tuple[BatchedStream, int]] = []  # each stream with its number of entries
        pipe = self.client.pipeline(transaction=False)
        while self._waiting and len(batch) < MAX_STREAMS_PER_FLUSH:
            stream = next(iter(self._waiting))
            del self._waiting[stream]
            entries, ttl = stream._next_entries(self.tokens_per_entry)
            for entry in entries:  # one connection runs them in order
                args = scripts.append_args(
                    stream.writer_token, entry, ttl=ttl, maxlen=stream.maxlen
                )
                pipe.evalsha(scripts.APPEND.sha, 2, *stream._keys, *args)
            if entries:
                batch.append((stream, len(entries)))
        if not batch:
            return True
        try:
            replies = await pipe.execute(raise_on_error=False)
            down = down_reply(replies)  # a read-only replica, a busy Redis: resend them all
            if down is not None:
                raise down
        except (RedisConnectionError, RedisTimeoutError) as exc:
            for stream, _ in batch:
                self._waiting[stream] = None
            try:
                self.outage.failed(exc)
            except RedisUnavailableError as gone:  # past the limit: stop holding on
                self._give_up(gone)
            return False
        self.outage.ok()
        if any(isinstance(reply, NoScriptError) for reply in replies):
            await self.client.script_load(scripts.APPEND.source)  # after a Redis restart
            for stream, _ in batch:  # not one of them ran: send them all again
                self._waiting[stream] = None
            return True
        self.flushes += 1
        replies_of = iter(replies)
        for stream, count in batch:
            theirs = [next(replies_of) for _ in range(count)]
            refused = next((r for r in theirs if isinstance(r, Exception)), None)
            if refused is not None:
                stream._refused(scripts.refusal(str(refused)))
            else:
                self.entries += count
                stream._sent()
        return True

    def _give_up(self, error: RedisUnavailableError) -> None:
        """Refuse every stream still waiting to be written: the outage outlasted its limit."""
        log.error("stream.writes_abandoned", streams=len(self._waiting), reason=str(error))
        for stream in self._waiting:
            stream._refused(error)
        self._waiting.clear()
