"""Reading a job's token stream: replay, resume after an entry id, or follow live, to the end.

A follower holds one connection of the client's pool for as long as it reads, and every
command it sends, and the making of that connection, has its own socket deadline, so
`timeout=` holds even against a Redis that stops answering (only the wait for a free pooled
connection, `connection.POOL_WAIT`, lies outside it). Every record passes the stream's
integrity rules (`StreamCheck`) before it is yielded. A stream that disappears under its
reader (it expired, or was deleted) ends the read with `StreamExpiredError` instead of an
endless wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from redis import Redis
from redis.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import JobNotFoundError, StreamExpiredError, StreamTimeoutError
from tokenrelay.stream import keys
from tokenrelay.stream.integrity import StreamCheck
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import Record, is_terminal, records, text

#: The stream id that means "from the very start".
BEGINNING = "0-0"

#: Entries per read: a page of a replay, or what a follower takes at once.
PAGE = 512

#: The longest one XREAD blocks on the server; between blocks the reader checks the stream
#: still exists and its own deadline.
MAX_BLOCK = 2.0

#: How much longer than the server's block a reply may take before Redis counts as silent.
REPLY_GRACE = 5.0


def _prev(entry_id: str) -> str:
    """The id just before `entry_id`, so that XREAD returns `entry_id` itself."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(raw: Any) -> list[Record]:
    """Records from raw stream entries: [id, fields] pairs, fields a flat list or a map."""
    pairs = []
    for entry_id, fields in raw or []:
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        pairs.append((entry_id, fields))
    return records(pairs)


def _xread_entries(raw: Any) -> list[Record]:
    """The records of a raw XREAD reply for one stream: RESP2 [[key, entries]], RESP3 {key: …}."""
    if not raw:
        return []
    if isinstance(raw, dict):
        return [r for entries in raw.values() for r in _entries(entries)]
    return [r for _, entries in raw for r in _entries(entries)]


def read_stream(
    client: Redis,
    job_id: str,
    *,
    after: str = BEGINNING,
    live: bool = False,
    timeout: float | None = None,
    alive_keys: Sequence[str] = (),
) -> Iterator[Record]:
    """Yield the job's entries after `after`, following the stream until its terminal entry.

    `live` starts at the newest entry at the time of the call instead, skipping what was
    generated before. `alive_keys` are keys whose existence means the stream may still
    come (the queued job's): with neither them nor the stream there, the read ends with
    JobNotFoundError at once, or StreamExpiredError if the stream vanished while being read.
    Raises StreamTimeoutError if the stream has not ended `timeout` seconds after the call,
    and ProtocolError if the stream breaks its integrity rules.
    """
    follower = _Follower(client, job_id, alive_keys, timeout)
    if live:  # where "now" is, when the reader asks (not when it first reads)
        newest = records(client.xrevrange(follower.key, count=1))
        if newest:
            entry = newest[0]
            # A live reader of a stream that has already ended is still given its terminal entry.
            after = _prev(entry.id) if is_terminal(entry.entry) else entry.id
    return follower.follow(after)


class _Follower:
    """Reads one stream on a connection of its own, each command bounded by the deadline."""

    def __init__(
        self, client: Redis, job_id: str, alive_keys: Sequence[str], timeout: float | None
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.key = keys.token_stream(job_id)
        self.state_key = keys.stream_state(job_id)
        self.alive_keys = [self.key, *alive_keys]
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def follow(self, after: str) -> Iterator[Record]:
        pool = self.client.connection_pool
        connection = self._connection(pool)
        try:
            if not self._command(connection, "EXISTS", *self.alive_keys):
                raise JobNotFoundError(f"no job {self.job_id!r} (it may have expired)")
            last = after
            if self._ended_before(connection, last):
                return  # resumed at or past the terminal entry: nothing more will come
            check = StreamCheck(self.key, from_start=last == BEGINNING)
            while True:
                batch = self._read(connection, last)
                if not batch:
                    if self._ended_before(connection, last):
                        return
                    continue
                for record in batch:
                    check.check(record)
                    last = record.id
                    yield record
                    if is_terminal(record.entry):
                        return
        finally:
            pool.release(connection)

    def _connection(self, pool: Any) -> Connection:
        """A connection of the pool; made within the deadline, where the pool can do that."""
        within = getattr(pool, "get_connection_within", None)
        remaining = self._remaining()
        if within is None or remaining is None:
            connection: Connection = pool.get_connection()
            return connection
        try:
            connection = within(remaining)
        except RedisTimeoutError:
            raise StreamTimeoutError(f"{self.key} did not end in time") from None
        return connection

    def _remaining(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeoutError(f"{self.key} did not end in time")
        return remaining

    def _command(self, connection: Connection, *args: Any, block: float = 0.0) -> Any:
        """Send one command; wait for its raw reply no longer than the block and the deadline."""
        remaining = self._remaining()
        wait = block + REPLY_GRACE if remaining is None else min(block + REPLY_GRACE, remaining)
        try:
            connection.send_command(*args)  # type: ignore[no-untyped-call]  # unannotated
            return connection.read_response(timeout=wait)
        except RedisTimeoutError:
            if remaining is not None and wait >= remaining:  # the deadline cut the wait short
                raise StreamTimeoutError(f"{self.key} did not end in time") from None
            raise

    def _read(self, connection: Connection, last: str) -> list[Record]:
        remaining = self._remaining()
        block = MAX_BLOCK if remaining is None else min(MAX_BLOCK, remaining)
        reply = self._command(
            connection,
            "XREAD",
            "COUNT",
            PAGE,
            "BLOCK",
            max(1, int(block * 1000)),
            "STREAMS",
            self.key,
            last,
            block=block,
        )
        return _xread_entries(reply)

    def _ended_before(self, connection: Connection, last: str) -> bool:
        """After an idle block: whether the stream ended at or before `last` (a resume past the
        end); raises StreamExpiredError if the stream and what it waits on are gone."""
        if not self._command(connection, "EXISTS", *self.alive_keys):
            raise StreamExpiredError(f"{self.key} is gone: it expired or was deleted")
        end = self._command(connection, "HGET", self.state_key, StateField.END.value)
        return end is not None and _order(last) >= _order(text(end))


def scan_stream(client: Redis, job_id: str, *, page: int = PAGE) -> Iterator[Record]:
    """Every entry of the job's stream as it is now, page by page, checked; no waiting.

    For consumers that read whole streams of ended jobs (the recorder, metrics): memory
    stays at one page whatever the stream's length.
    """
    key = keys.token_stream(job_id)
    check = StreamCheck(key)
    start = "-"
    while True:
        batch = records(client.xrange(key, min=start, count=page))
        for record in batch:
            check.check(record)
            yield record
        if len(batch) < page:
            return
        start = f"({batch[-1].id}"
