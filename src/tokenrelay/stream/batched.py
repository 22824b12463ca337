"""One job's stream as its worker writes it: tokens taken at once, written by the batcher.

A job adds tokens to its `BatchedStream` without any Redis round trip: each costs a list
append. The process's `StreamBatcher` (`stream.batcher`) writes them, in order, a few entries
at a time. Tokens are checked to be valid UTF-8 (a surrogate pair split over two deltas is
joined, a lone one replaced) and kept as the stream's text, for a retry to go on from.
The other writes of an attempt (its `start`, `status` and `attempt` entries, its terminal
entry) go through the batcher one at a time, after every token taken before them.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from tokenrelay.errors import RedisUnavailableError
from tokenrelay.stream import scripts
from tokenrelay.stream.lease_scripts import Claim
from tokenrelay.stream.protocol import (
    AttemptEntry,
    LifecycleEvent,
    Policy,
    StartEntry,
    StatusEntry,
    Terminal,
    TokenEntry,
)
from tokenrelay.stream.text import TextBuffer
from tokenrelay.stream.writer import new_writer_token, terminal_event

if TYPE_CHECKING:
    from tokenrelay.stream.batcher import StreamBatcher

log = structlog.get_logger()


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
        claim: Claim | None = None,
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
        #: Whether this writer holds the stream (its `start` is written, or it took the job
        #: over) and has not closed it: only then does the worker renew the job's lease.
        self.begun = claim is not None
        self.closed = False
        self._text = TextBuffer()  # the text so far, as this writer has it
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
    def text(self) -> str:
        """The stream's text so far: what this writer took (after `seed`, what it went on from)."""
        return str(self._text)

    def seed(self, text: str) -> None:
        """The text the stream held before this writer took it over."""
        self._text = TextBuffer(text)

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
        self.begun = True

    async def status(self, entry: StatusEntry) -> None:
        """Write a `status` entry after every token taken."""
        await self.drain()
        args = scripts.status_args(self.writer_token, entry, nonce=new_writer_token())
        await self._batcher.run(scripts.STATUS, self._keys, args)

    async def new_attempt(self, entry: AttemptEntry, *, streamed: int = 0) -> None:
        """Write an `attempt` entry after every token taken, with the tokens the attempt that
        ended streamed; with the restart policy the tokens count from 0 again."""
        await self.drain()
        args = scripts.attempt_args(self.writer_token, entry, streamed=streamed)
        await self._batcher.run(scripts.ATTEMPT, self._keys, args)
        if entry.policy == Policy.RESTART:
            self.tokens = self._next_seq = 0
            self._text.clear()

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
        self._text.add(text)
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
        self.closed = True
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
