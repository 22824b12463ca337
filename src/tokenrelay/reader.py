"""Reading a job's token stream: replay, resume after an entry id, or follow live, to the end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from redis import Redis

from tokenrelay import keys
from tokenrelay.errors import ProtocolError, StreamTimeoutError
from tokenrelay.protocol import Record, TokenEntry, is_terminal, records

#: The stream id that means "from the very start".
BEGINNING = "0-0"

_BATCH = 512
_MAX_BLOCK = 2.0


def _first_id(client: Redis, key: str, live: bool, after: str) -> str:
    """Where to start reading: `after`, or for a live reader, the newest entry so far."""
    if not live:
        return after
    newest = records(client.xrevrange(key, count=1))
    if not newest:
        return BEGINNING
    # A live reader of a stream that has already ended is still given its terminal entry.
    return _prev(newest[0].id) if is_terminal(newest[0].entry) else newest[0].id


def _prev(entry_id: str) -> str:
    """The id just before `entry_id`, so that XREAD returns `entry_id` itself."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def read_stream(
    client: Redis,
    job_id: str,
    *,
    after: str = BEGINNING,
    live: bool = False,
    timeout: float | None = None,
) -> Iterator[Record]:
    """Yield the job's entries after `after`, following the stream until its terminal entry.

    `live` starts at the newest entry at the time of the call instead, skipping
    what was generated before. Raises StreamTimeoutError if the stream has not
    ended `timeout` seconds after the call, and ProtocolError if a token is
    missing; a repeated token is skipped.
    """
    key = keys.token_stream(job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    return _follow(client, key, _first_id(client, key, live, after), _block(client), deadline)


def _block(client: Redis) -> float:
    """How long one XREAD may block: well inside the client's socket timeout."""
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return _MAX_BLOCK if not socket_timeout else min(_MAX_BLOCK, socket_timeout / 2)


def _follow(
    client: Redis, key: str, last: str, block: float, deadline: float | None
) -> Iterator[Record]:
    next_seq: int | None = None
    while True:
        wait = block if deadline is None else min(block, deadline - time.monotonic())
        if wait <= 0:
            raise StreamTimeoutError(f"{key} did not end in time")
        response: Any = client.xread({key: last}, count=_BATCH, block=max(1, int(wait * 1000)))
        if not response:
            continue
        for record in records(response[0][1]):
            last, entry = record
            if isinstance(entry, TokenEntry):
                if next_seq is not None and entry.seq < next_seq:
                    continue
                if next_seq is not None and entry.seq > next_seq:
                    raise ProtocolError(
                        f"{key}: token {next_seq} is missing (got {entry.seq} at {last})"
                    )
                next_seq = entry.seq + 1
            yield record
            if is_terminal(entry):
                return
