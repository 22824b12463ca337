"""Reading a job's token stream: replay, resume after an entry id, or follow live, to the end.

A follower holds one connection of the client's pool for as long as it reads, and every
read on it has its own socket deadline, so `timeout=` holds even against a Redis that stops
answering. Every record passes the stream's integrity rules (`StreamCheck`) before it is
yielded. A stream that disappears under its reader (it expired, or was deleted) ends the
read with `StreamExpiredError` instead of an endless wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from redis import Redis
from redis.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import StreamExpiredError, StreamTimeoutError
from tokenrelay.stream import keys
from tokenrelay.stream.integrity import StreamCheck
from tokenrelay.stream.protocol import Record, is_terminal, records

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


def _first_id(client: Redis, key: str, live: bool, after: str) -> str:
    """Where to start reading: `after`, or for a live reader, the newest entry so far."""
    if not live:
        return after
    newest = records(client.xrevrange(key, count=1))
    if not newest:
        return BEGINNING
    # A live reader of a stream that has already ended is still given its terminal entry.
    return _prev(newest[0].id) if is_terminal(newest[0].entry) else newest[0].id


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
    come (the queued job's); with neither them nor the stream left, the read ends with
    StreamExpiredError. Raises StreamTimeoutError if the stream has not ended `timeout`
    seconds after the call, and ProtocolError if the stream breaks its integrity rules.
    """
    key = keys.token_stream(job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    first = _first_id(client, key, live, after)
    check = StreamCheck(key, from_start=first == BEGINNING)
    follower = _Follower(client, key, [key, keys.stream_state(job_id), *alive_keys], deadline)
    return follower.follow(first, check)


class _Follower:
    """XREADs one stream on a connection of its own, each read bounded by the deadline."""

    def __init__(
        self, client: Redis, key: str, alive_keys: list[str], deadline: float | None
    ) -> None:
        self.client = client
        self.key = key
        self.alive_keys = alive_keys
        self.deadline = deadline

    def follow(self, last: str, check: StreamCheck) -> Iterator[Record]:
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            while True:
                batch = self._read(connection, last)
                if not batch:
                    self._check_alive(connection)
                    continue
                for record in batch:
                    check.check(record)
                    last = record.id
                    yield record
                    if is_terminal(record.entry):
                        return
        finally:
            pool.release(connection)

    def _remaining(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeoutError(f"{self.key} did not end in time")
        return remaining

    def _command(self, connection: Connection, *args: Any, block: float) -> Any:
        """Send one command and wait for its reply no longer than the block and the deadline."""
        remaining = self._remaining()
        wait = block + REPLY_GRACE if remaining is None else min(block + REPLY_GRACE, remaining)
        connection.send_command(*args)  # type: ignore[no-untyped-call]  # unannotated in redis-py
        try:
            reply = connection.read_response(timeout=wait)
        except RedisTimeoutError:
            self._remaining()  # past the deadline: StreamTimeoutError
            raise
        callbacks: dict[str, Any] = dict(self.client.response_callbacks)
        callback = callbacks.get(args[0])
        return callback(reply) if callback else reply

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
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {key: [entries]}
            streams = [entries for value in reply.values() for entries in value]
        else:  # RESP2: [[key, entries]]
            streams = [entries for _, entries in reply]
        return [record for entries in streams for record in records(_entries(entries))]

    def _check_alive(self, connection: Connection) -> None:
        """End the read if the stream, its state and the job it waits on are all gone."""
        if not self._command(connection, "EXISTS", *self.alive_keys, block=0):
            raise StreamExpiredError(f"{self.key} is gone: it expired or was deleted")


def _entries(raw: Any) -> Any:
    """XREAD's entries with each entry's fields as a mapping (RESP2 replies give a flat list)."""
    out = []
    for entry_id, fields in raw:
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append((entry_id, fields))
    return out


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
