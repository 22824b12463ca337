"""What a new attempt goes on from: the stream's `start` entry and its text so far.

Read back from Redis, as readers see it, both when an attempt failed in this worker and
when this worker took over a dead one's job: one source of truth for the continuation.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import asyncio as aioredis

from tokenrelay.outage import Outage, aretry
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import StartEntry, records
from tokenrelay.stream.reader import PAGE
from tokenrelay.stream.text import Transcript


@dataclass(frozen=True)
class SoFar:
    """A stream's start entry (None if a length cap trimmed it) and its text."""

    start: StartEntry | None
    text: str
    tokens: int


async def read_so_far(client: aioredis.Redis, job_id: str, outage: Outage) -> SoFar:
    """The job's stream as it stands, page by page, waiting out a Redis outage."""
    key = keys.token_stream(job_id)
    transcript, start, first = Transcript(), None, "-"
    while True:
        lower = first

        async def page(lower: str = lower) -> object:
            return await client.xrange(key, min=lower, count=PAGE)

        batch = records(await aretry(outage, page))
        for _, entry in batch:
            if isinstance(entry, StartEntry):
                start = entry
            transcript.add(entry)
        if len(batch) < PAGE:
            return SoFar(start, transcript.text, transcript.tokens)
        first = f"({batch[-1].id}"
