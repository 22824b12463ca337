"""What a worker that takes over a job goes on from: the stream's text so far, as readers see it.

A retry in the same worker goes on from the text it wrote itself (`BatchedStream.text`); one
taken over from a dead worker can only read it back from Redis. On a stream with a length cap
(TOKENRELAY_STREAM_MAXLEN) that is the part not yet trimmed: the model is then asked to go on
from the tail alone.
"""

from __future__ import annotations

from redis import asyncio as aioredis

from tokenrelay.outage import Outage, aretry
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import records
from tokenrelay.stream.reader import PAGE
from tokenrelay.stream.text import Transcript


async def read_text(client: aioredis.Redis, job_id: str, outage: Outage) -> str:
    """The job's text as its stream holds it, page by page, waiting out a Redis outage."""
    key = keys.token_stream(job_id)
    transcript, lower = Transcript(), "-"
    while True:

        async def page(lower: str = lower) -> object:
            return await client.xrange(key, min=lower, count=PAGE)

        batch = records(await aretry(outage, page))
        for _, entry in batch:
            transcript.add(entry)
        if len(batch) < PAGE:
            return transcript.text
        lower = f"({batch[-1].id}"
