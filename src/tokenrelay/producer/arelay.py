"""The asyncio API: `AsyncRelay` and `AsyncJobHandle`, for applications on an event loop.

An `AsyncRelay` follows any number of jobs through one shared reader (`StreamHub`): one
Redis read per watched stream, whatever the number of followers, so a FastAPI or aiohttp
application can follow thousands of streams in one process. Submitting, status and cancel
go through the synchronous `Relay` on a worker thread (RQ is synchronous), with exactly its
checks and messages.

    async with AsyncRelay.from_env() as relay:
        job = await relay.asubmit("Explain Redis streams")
        async for token in job.atokens():
            print(token, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from redis import asyncio as aioredis
from rq.job import Job

from tokenrelay.connection import async_client_for, client_for
from tokenrelay.producer.handle import JobHandle, JobState, Outcome, Result, token_of
from tokenrelay.producer.relay import Relay
from tokenrelay.settings import Settings
from tokenrelay.stream.follower import follow
from tokenrelay.stream.hub import StreamHub
from tokenrelay.stream.protocol import Record
from tokenrelay.stream.reader import BEGINNING


class AsyncJobHandle:
    """One submitted job, followed through its relay's shared reader."""

    def __init__(self, relay: AsyncRelay, job_id: str) -> None:
        self.job_id = job_id
        self._relay = relay
        self._sync = relay.relay.job(job_id)

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.job_id!r})"

    async def arecords(
        self, *, after: str = BEGINNING, live: bool = False, timeout: float | None = None
    ) -> AsyncIterator[Record]:
        """Every entry of the job's stream after `after`, until its terminal entry.

        As `JobHandle.records`: JobNotFoundError, StreamTimeoutError, RedisUnavailableError
        and ProtocolError alike, and `gap` records where a capped stream lost tokens.
        """
        batches = follow(
            self._relay.hub,
            self.job_id,
            after=after,
            live=live,
            timeout=timeout,
            alive_keys=[Job.key_for(self.job_id)],
        )
        async for batch in batches:
            for record in batch:
                yield record

    async def atokens(
        self, *, after: str = BEGINNING, timeout: float | None = None
    ) -> AsyncIterator[str]:
        """The generated text, token by token, as it arrives (as `JobHandle.tokens`)."""
        async for _, entry in self.arecords(after=after, timeout=timeout):
            token = token_of(entry)
            if token is not None:
                yield token

    async def aresult(self, timeout: float | None = None) -> Result:
        """Wait for the job to end; its final text and `end` entry, or JobFailedError."""
        outcome = Outcome(self.job_id)
        async for _, entry in self.arecords(timeout=timeout):
            result = outcome.take(entry)
            if result is not None:
                return result
        raise AssertionError("follow ends only after a terminal entry")  # pragma: no cover

    async def atext(self, timeout: float | None = None) -> str:
        """Wait for the job to end and return its whole text, or raise JobFailedError."""
        return (await self.aresult(timeout)).text

    async def astatus(self) -> JobState:
        """The job's state (as `JobHandle.status`)."""
        return await asyncio.to_thread(self._sync.status)

    async def acancel(self) -> bool:
        """Cancel the job (as `JobHandle.cancel`)."""
        return await asyncio.to_thread(self._sync.cancel)


class AsyncRelay:
    """Submits jobs and follows them from asyncio code, all followers sharing one reader.

    Use it as an async context manager (or call `start()` and `aclose()`) inside the event
    loop that follows the jobs.
    """

    def __init__(self, relay: Relay, client: aioredis.Redis) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.client = client
        self.hub = StreamHub(
            client,
            outage_limit=self.settings.redis_outage_limit,
            queue_size=self.settings.reader_queue,
        )

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> AsyncRelay:
        """A relay for the configured Redis; raises RedisUnavailableError if it is down."""
        settings = settings or Settings.from_env()
        return cls(Relay(client_for(settings), settings), async_client_for(settings))

    def start(self) -> None:
        """Start the shared reader."""
        self.hub.start()

    async def aclose(self) -> None:
        """Stop the shared reader and release the connections."""
        await self.hub.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()  # a pool of our own: aclose leaves it
        self.relay.close()

    async def __aenter__(self) -> AsyncRelay:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job, by id."""
        return AsyncJobHandle(self, job_id)

    async def asubmit(self, prompt: str | None = None, **options: Any) -> AsyncJobHandle:
        """Queue one generation, with `Relay.submit`'s arguments, checks and errors."""
        handle: JobHandle = await asyncio.to_thread(self.relay.submit, prompt, **options)
        return self.job(handle.job_id)
