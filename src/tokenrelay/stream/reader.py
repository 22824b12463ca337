"""Reading a job's token stream: replay, resume after an entry id, or follow live, to the end.

A follower reads on one connection of the client's pool, through a `Channel`: every command
has its own deadline, so `timeout=` holds even against a Redis that stops answering, and a
Redis outage (a restart, a failover) is ridden out: the follower reconnects with backoff and
jitter and reads on after the last entry it yielded, so no entry is missed or doubled, for up
to `outage_limit` seconds (then RedisUnavailableError). Every record passes the stream's
integrity rules (`StreamCheck`) before it is yielded; on a stream with a length cap, tokens
trimmed before they were read come as a `gap` record. A stream that disappears under its
reader (it expired, was deleted, or Redis restarted without its data) ends the read with
`StreamExpiredError` instead of an endless wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from redis import Redis

from tokenrelay.errors import JobNotFoundError, StreamExpiredError
from tokenrelay.outage import Outage
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.channel import Channel
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

#: Seconds a reader rides out Redis being unreachable, unless told otherwise
#: (TOKENRELAY_REDIS_OUTAGE_LIMIT's default).
OUTAGE_LIMIT: float = Settings.redis_outage_limit


def id_before(entry_id: str) -> str:
    """The id just before `entry_id`, so that XREAD returns `entry_id` itself."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def raw_records(raw: Any) -> list[Record]:
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
        return [r for entries in raw.values() for r in raw_records(entries)]
    return [r for _, entries in raw for r in raw_records(entries)]


def is_capped(maxlen: Any) -> bool:
    """Whether a state hash's `maxlen` field (None when absent) gives the stream a length cap."""
    return maxlen is not None and int(text(maxlen)) > 0


def _checked(check: StreamCheck, record: Record, last: str) -> Iterator[Record]:
    """The record, after its check; preceded by a `gap` record (its id `last`, the entry id
    before) if tokens were trimmed before it."""
    gap = check.check(record)
    if gap is not None:
        yield Record(last, gap)
    yield record


def read_stream(
    client: Redis,
    job_id: str,
    *,
    after: str = BEGINNING,
    live: bool = False,
    timeout: float | None = None,
    alive_keys: Sequence[str] = (),
    outage_limit: float = OUTAGE_LIMIT,
) -> Iterator[Record]:
    """Yield the job's entries after `after`, following the stream until its terminal entry.

    `live` starts at the newest entry at the time of the call instead, skipping what was
    generated before. `alive_keys` are keys whose existence means the stream may still
    come (the queued job's): with neither them nor the stream there, the read ends with
    JobNotFoundError at once, or StreamExpiredError if the stream vanished while being read.
    Raises StreamTimeoutError if the stream has not ended `timeout` seconds after the call,
    RedisUnavailableError if Redis stays unreachable for longer than `outage_limit` seconds,
    and ProtocolError if the stream breaks its integrity rules.
    """
    follower = _Follower(client, job_id, alive_keys, timeout, outage_limit)
    if live:  # where "now" is, when the reader asks (not when it first reads)
        after = follower.newest()
    return follower.follow(after)


class _Follower:
    """Reads one stream on a channel of its own, each command bounded by the deadline."""

    def __init__(
        self,
        client: Redis,
        job_id: str,
        alive_keys: Sequence[str],
        timeout: float | None,
        outage_limit: float,
    ) -> None:
        self.client = client  # held while reading: a client closes its pool when collected
        self.job_id = job_id
        self.key = keys.token_stream(job_id)
        self.state_key = keys.stream_state(job_id)
        self.alive_keys = [self.key, *alive_keys]
        self.channel = Channel(
            client,
            deadline=None if timeout is None else time.monotonic() + timeout,
            outage=Outage(outage_limit, who=f"reader of {self.key}"),
            late=f"{self.key} did not end in time",
        )

    def newest(self) -> str:
        """Where a live reader starts: after the newest entry, or just before it if it ends
        the stream (a live reader of an ended stream is still given its terminal entry)."""
        with self.channel:
            newest = raw_records(self.channel.call("XREVRANGE", self.key, "+", "-", "COUNT", 1))
        if not newest:
            return BEGINNING
        entry = newest[0]
        return id_before(entry.id) if is_terminal(entry.entry) else entry.id

    def follow(self, after: str) -> Iterator[Record]:
        with self.channel:
            if not self.channel.call("EXISTS", *self.alive_keys):
                raise JobNotFoundError(f"no job {self.job_id!r} (it may have expired)")
            if self._ended_before(after):
                return  # resumed at or past the terminal entry: nothing more will come
            last, check = after, None
            while True:
                batch = self._read(last)
                if not batch:
                    if self._ended_before(last):
                        return
                    continue
                if check is None:  # the stream has begun: its state says if it is capped
                    maxlen = self.channel.call("HGET", self.state_key, StateField.MAXLEN.value)
                    check = StreamCheck(
                        self.key, from_start=after == BEGINNING, capped=is_capped(maxlen)
                    )
                for record in batch:
                    yield from _checked(check, record, last)
                    last = record.id
                    if is_terminal(record.entry):
                        return

    def _read(self, last: str) -> list[Record]:
        remaining = self.channel.remaining()
        block = MAX_BLOCK if remaining is None else min(MAX_BLOCK, remaining)
        reply = self.channel.call(
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

    def _ended_before(self, last: str) -> bool:
        """After an idle block: whether the stream ended at or before `last` (a resume past the
        end); raises StreamExpiredError if the stream and what it waits on are gone."""
        if not self.channel.call("EXISTS", *self.alive_keys):
            raise StreamExpiredError(f"{self.key} is gone: it expired or was deleted")
        end = self.channel.call("HGET", self.state_key, StateField.END.value)
        return end is not None and id_order(last) >= id_order(text(end))


def scan_stream(client: Redis, job_id: str, *, page: int = PAGE) -> Iterator[Record]:
    """Every entry of the job's stream as it is now, page by page, checked; no waiting.

    For consumers that read whole streams of ended jobs (the recorder, metrics): memory
    stays at one page whatever the stream's length. On a capped stream, tokens trimmed
    before they were read come as a `gap` record, as `read_stream` gives them.
    """
    key = keys.token_stream(job_id)
    maxlen = client.hget(keys.stream_state(job_id), StateField.MAXLEN.value)
    check = StreamCheck(key, capped=is_capped(maxlen))
    start, last = "-", BEGINNING
    while True:
        batch = records(client.xrange(key, min=start, count=page))
        for record in batch:
            yield from _checked(check, record, last)
            last = record.id
        if len(batch) < page:
            return
        start = f"({batch[-1].id}"
