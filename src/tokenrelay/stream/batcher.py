"""The worker's stream writer: every running job's new tokens, written together, in batches.

A job adds tokens to its `BatchedStream` without any Redis round trip. One `StreamBatcher`
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
import time
from typing import Any

import structlog
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import RedisUnavailableError
from tokenrelay.outage import Outage, aretry, backoff
from tokenrelay.stream import keys, scripts
from tokenrelay.stream.protocol import (
    AttemptEntry,
    LifecycleEvent,
    Policy,
    StartEntry,
    StatusEntry,
    Terminal,
    TokenEntry,
)
from tokenrelay.stream.writer import new_writer_token, terminal_event

log = structlog.get_logger()

#: The most streams one pipeline carries.
MAX_STREAMS_PER_FLUSH = 1_000

#: The least time between two pipelines. A token that comes after a quiet spell is written at
#: once; in a burst, what comes within this time shares one entry a stream, and one pipeline
#: carries every stream's.
MIN_INTERVAL = 0.005


def _well_formed(text: str) -> str:
    """Join surrogate pairs split by the server's JSON encoding; replace lone ones with U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class BatchedStream:
    """One job's stream, written through its process's `StreamBatcher`: one writer, in order."""

    def __init__(
        self,
        batcher: StreamBatcher,
        job_id: str,
        *,
        ttl: int,
        events_cap: int,
        maxlen: int = 0,
        claim: scripts.Claim | None = None,
    ) -> None:
        self.job_id = job_id
        self.writer_token = new_writer_token() if claim is None else claim.writer
        self.ttl = ttl
        self.events_cap = events_cap
        self.maxlen = maxlen
        #: The text's tokens so far, written or waiting: the `seq` the next one gets.
        self.tokens = 0 if claim is None else claim.next_seq
        self.first_token_at: float | None = None
        self.error: Exception | None = None  # why the stream refused this writer
        self._batcher = batcher
        self._keys = scripts.stream_keys(job_id)
        self._pending: list[str] = []
        self._next_seq = self.tokens  # the seq of the next entry to send
        self._sending: list[TokenEntry] = []  # in flight, or to be sent again as they were
        self._held = ""  # a high surrogate whose low half may come with the next token
        self._written = asyncio.Event()
        self._written.set()
        self._expiry_renewed = time.monotonic()

    @property
    def backlogged(self) -> bool:
        """Whether the job should wait for its tokens to be written before adding more."""
        return len(self._pending) >= self._batcher.max_pending

    @property
    def backlog(self) -> int:
        """Tokens taken and not yet sent."""
        return len(self._pending)

    async def begin(self, start: StartEntry, *, queue: str | None, lease_ms: int) -> None:
        """Write the `start` entry; this stream's writer token becomes the only one allowed,
        and the job's lease lasts `lease_ms` unless renewed."""
        args = scripts.begin_args(
            start,
            ttl=self.ttl,
            queue=queue,
            events_cap=self.events_cap,
            lease_ms=lease_ms,
            maxlen=self.maxlen,
        )
        await self._batcher.run(scripts.BEGIN, scripts.with_events(self.job_id), args)

    async def status(self, entry: StatusEntry) -> None:
        """Write a `status` entry after every token taken."""
        await self.drain()
        args = scripts.status_args(self.writer_token, entry)
        await self._batcher.run(scripts.STATUS, self._keys, args)

    async def new_attempt(
        self, entry: AttemptEntry, *, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """Write an `attempt` entry after every token taken, with the usage of the attempt that
        ended; with the restart policy the tokens count from 0 again."""
        await self.drain()
        args = scripts.attempt_args(
            self.writer_token,
            entry,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        await self._batcher.run(scripts.ATTEMPT, self._keys, args)
        if entry.policy == Policy.RESTART:
            self.tokens = self._next_seq = 0

    def add(self, text: str) -> None:
        """Take one token to write; raises the stream's refusal once it refused this writer."""
        if self.error is not None:
            raise self.error
        if self._held or not text.isascii():  # ASCII needs no check; anything else might not
            text = self._checked(text)
        if text:  # an empty delta carries nothing to show
            self._take(text)

    @property
    def outage(self) -> bool:
        """Whether Redis is away (tokens are held in memory meanwhile)."""
        return self._batcher.outage.down

    def _checked(self, text: str) -> str:
        """The text as valid UTF-8: a split surrogate pair joined, a lone surrogate replaced."""
        if self._held:
            text, self._held = self._held + text, ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            if "\ud800" <= text[-1] <= "\udbff":
                text, self._held = text[:-1], text[-1]
            text = self._repaired(text)
        return text

    def _take(self, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self._pending.append(text)
        self.tokens += 1
        self._written.clear()
        self._batcher.mark(self)

    def _repaired(self, text: str) -> str:
        fixed = _well_formed(text)
        if "\ufffd" in fixed:
            log.warning("token.unencodable", seq=self.tokens, replaced=fixed.count("\ufffd"))
        return fixed

    async def drain(self) -> None:
        """Wait until every token taken is written; raises the stream's refusal, if any."""
        if self._held:  # the model's stream is over: a lone high surrogate stays lone
            held, self._held = self._held, ""
            self._take(self._repaired(held))
        await self._written.wait()
        if self.error is not None:
            raise self.error

    async def close(
        self, entry: Terminal, *, queue: str | None, model: str | None, nonce: str
    ) -> bool:
        """Write the terminal entry after every token; False if the stream ended elsewhere."""
        if isinstance(self.error, RedisUnavailableError):
            raise self.error  # the outage outlasted its limit: this worker cannot end it
        if self.error is None:
            await self.drain()
        event: LifecycleEvent = terminal_event(self.job_id, entry, queue, model)
        args = scripts.close_args(
            entry,
            event,
            writer=self.writer_token,
            nonce=nonce,
            ttl=self.ttl,
            events_cap=self.events_cap,
        )
        closed = await self._batcher.run(scripts.CLOSE, scripts.with_events(self.job_id), args)
        return closed is not None

    # Called by the batcher.

    def _next_entries(self, per_entry: int) -> tuple[list[TokenEntry], int]:
        """The entries to send now (at most `per_entry` tokens each, 0: no limit) and the TTL
        to renew with them (0: none). Entries whose fate is unknown go again, as they were."""
        if not self._sending and self._pending and self.error is None:
            size = per_entry or len(self._pending)
            seq = self._next_seq
            for start in range(0, len(self._pending), size):
                part = self._pending[start : start + size]
                self._sending.append(
                    TokenEntry(seq, "".join(part), len(part) if len(part) > 1 else None)
                )
                seq += len(part)
            self._pending.clear()
        now = time.monotonic()
        renew = now - self._expiry_renewed > self.ttl / 4
        if renew:
            self._expiry_renewed = now
        return self._sending, self.ttl if renew else 0

    def _sent(self) -> None:
        last = self._sending[-1]
        self._next_seq = last.seq + last.count
        self._sending = []
        if self._pending:
            self._batcher.mark(self)
        else:
            self._written.set()

    def _refused(self, error: Exception) -> None:
        log.info("stream.refused", job_id=self.job_id, reason=str(error))
        self.error = error
        self._sending = []
        self._pending.clear()
        self._written.set()


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
        claim: scripts.Claim | None = None,
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
