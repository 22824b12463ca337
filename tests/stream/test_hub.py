"""The shared reader and `AsyncRelay`: many followers, one Redis read, the reader's semantics."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
from redis import Redis
from support.scripts import ScriptedLLM
from support.workers import Workers

from tokenrelay import (
    AsyncRelay,
    EndEntry,
    JobNotFoundError,
    Settings,
    StartEntry,
    StreamExpiredError,
    StreamTimeoutError,
    TokenEntry,
)
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.errors import ReaderLaggedError
from tokenrelay.stream.follower import follow
from tokenrelay.stream.keys import stream_state, token_stream
from tokenrelay.stream.writer import StreamWriter


def begun(client: Redis, job_id: str) -> StreamWriter:
    """A writer that has written the job's `start` entry and one token."""
    writer = StreamWriter(client, job_id, ttl=600)
    writer.start(StartEntry(job_id, "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token))
    writer.token("first")
    return writer


def test_a_submitted_job_streams_through_atokens(
    settings: Settings, llm: ScriptedLLM, workers: Workers
) -> None:
    """`asubmit` and `async for token in job.atokens()` give the scripted text."""

    async def main() -> tuple[list[str], str]:
        async with AsyncRelay.from_env(settings) as relay:
            job = await relay.asubmit("hi", model=llm.script(["Hello", ",", " world"]))
            workers.start()
            tokens = [token async for token in job.atokens(timeout=30)]
            return tokens, await job.atext(timeout=5)

    tokens, text = asyncio.run(main())
    assert "".join(tokens) == text == "Hello, world"


def test_three_hundred_followers_share_one_read_per_entry(
    redis_client: Redis, settings: Settings
) -> None:
    """Hundreds of followers of one stream in one process cost about one XREAD per write."""
    writer = begun(redis_client, "popular")

    async def main() -> tuple[list[str], int]:
        async with AsyncRelay.from_env(settings) as relay:

            async def one() -> str:
                return "".join([t async for t in relay.job("popular").atokens(timeout=60)])

            followers = [asyncio.create_task(one()) for _ in range(300)]
            while relay.hub.watched == 0:  # the first follower has subscribed
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            reads = relay.hub.reads
            for i in range(20):
                await asyncio.to_thread(writer.token, f" {i}")
            await asyncio.to_thread(writer.close, EndEntry("stop", 21))
            texts = await asyncio.gather(*followers)
            return texts, relay.hub.reads - reads

    texts, reads = asyncio.run(main())
    assert texts == ["first" + "".join(f" {i}" for i in range(20))] * 300
    assert reads <= 2 * 21 + 5


def test_a_follower_that_falls_behind_catches_up_from_redis(
    redis_client: Redis, settings: Settings
) -> None:
    """With a queue of two, a follower that does not read for a while still gets every token."""
    writer = begun(redis_client, "laggard")

    async def main() -> tuple[str, str]:
        async with AsyncRelay.from_env(settings.with_overrides(reader_queue=2)) as relay:
            records = relay.job("laggard").arecords(timeout=30)
            first = await anext(records)
            for i in range(50):
                await asyncio.to_thread(writer.token, f" {i}")
            await asyncio.to_thread(writer.close, EndEntry("stop", 51))
            rest = [r async for r in records]
            text = "".join(r.entry.text for r in [first, *rest] if isinstance(r.entry, TokenEntry))
            return text, await relay.job("laggard").atext(timeout=5)

    text, whole = asyncio.run(main())
    assert text == whole == "first" + "".join(f" {i}" for i in range(50))


def test_the_gateway_mode_raises_when_a_follower_lags(
    redis_client: Redis, settings: Settings
) -> None:
    """With `resume_on_lag=False` an overflow is ReaderLaggedError naming the last entry given."""
    writer = begun(redis_client, "lagging")

    async def main() -> tuple[str, str]:
        async with AsyncRelay.from_env(settings.with_overrides(reader_queue=2)) as relay:
            batches = follow(relay.hub, "lagging", timeout=30, resume_on_lag=False)
            given = await anext(batches)  # the replay
            await asyncio.to_thread(writer.token, " live")
            given += await anext(batches)  # live now
            for i in range(20):
                await asyncio.to_thread(writer.token, f" {i}")
            try:
                while True:  # what was queued before the overflow, then the error
                    given += await anext(batches)
            except ReaderLaggedError as lagged:
                return lagged.last_id, given[-1].id

    last_id, given_id = asyncio.run(main())
    assert last_id == given_id


def test_an_overflow_while_replaying_a_long_stream_only_replays_further(
    redis_client: Redis, settings: Settings
) -> None:
    """A follower whose queue overflows during its replay is not lagging: it reads on."""
    writer = begun(redis_client, "long")
    for i in range(1500):  # three pages of replay
        writer.token(f" {i}")

    async def main() -> str:
        async with AsyncRelay.from_env(settings.with_overrides(reader_queue=2)) as relay:
            batches = follow(relay.hub, "long", timeout=30, resume_on_lag=False)
            given = await anext(batches)  # the first page; the follower now waits on us
            for i in range(1500, 1510):
                await asyncio.to_thread(writer.token, f" {i}")
            last = redis_client.xrevrange(token_stream("long"), count=1)[0][0].decode()
            deadline = time.monotonic() + 30
            while relay.hub.read_to("long") != last:  # the hub has pushed them all: overflow
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            while len(given) < 1512:  # the rest of the replay: start and 1,511 tokens
                given += await anext(batches)
            await asyncio.to_thread(writer.close, EndEntry("stop", 1511))
            async for batch in batches:  # live now: the end comes, and no ReaderLaggedError
                given += batch
            return "".join(r.entry.text for r in given if isinstance(r.entry, TokenEntry))

    text = asyncio.run(main())
    assert text == "first" + "".join(f" {i}" for i in range(1510))


def test_unknown_vanished_and_late_streams_end_the_read(
    redis_client: Redis, settings: Settings
) -> None:
    """JobNotFoundError at once, StreamExpiredError when it vanishes, StreamTimeoutError late."""
    begun(redis_client, "vanishing")
    begun(redis_client, "slow")

    async def main() -> None:
        async with AsyncRelay.from_env(settings) as relay:
            with pytest.raises(JobNotFoundError):
                await anext(relay.job("nobody").arecords(timeout=5))
            records = relay.job("vanishing").arecords(timeout=60)
            await anext(records), await anext(records)
            redis_client.delete(token_stream("vanishing"), stream_state("vanishing"))
            with pytest.raises(StreamExpiredError, match="is gone"):
                await anext(records)
            started = time.monotonic()
            with pytest.raises(StreamTimeoutError):
                _ = [r async for r in relay.job("slow").arecords(timeout=1)]
            assert time.monotonic() - started < 3

    asyncio.run(main())


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server with its append-only file, for a restart that keeps the data."""
    with RedisServer(appendonly=True) as server:
        yield server


def test_followers_ride_out_a_redis_restart(aof_redis: RedisServer, settings: Settings) -> None:
    """Redis stopped and started again mid-stream: every follower gets every token once."""
    client = connect(aof_redis.url)
    writer = begun(client, "restart")
    own = settings.with_overrides(redis_url=aof_redis.url)

    async def main() -> list[str]:
        async with AsyncRelay.from_env(own) as relay:

            async def one() -> str:
                return "".join([t async for t in relay.job("restart").atokens(timeout=60)])

            followers = [asyncio.create_task(one()) for _ in range(20)]
            while relay.hub.watched == 0:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(aof_redis.stop, keep_data=True)
            await asyncio.sleep(2)  # the outage itself
            await asyncio.to_thread(aof_redis.start)
            for i in range(10):
                await asyncio.to_thread(writer.token, f" {i}")
            await asyncio.to_thread(writer.close, EndEntry("stop", 11))
            return await asyncio.gather(*followers)

    try:
        texts = asyncio.run(main())
    finally:
        client.close()
    assert texts == ["first" + "".join(f" {i}" for i in range(10))] * 20


def test_a_frozen_redis_does_not_stop_a_follower_deadline(
    own_redis: RedisServer, settings: Settings
) -> None:
    """With Redis stopped (SIGSTOP), a follower's `timeout=` still ends its read on time."""
    client = connect(own_redis.url)
    begun(client, "frozen")
    own = settings.with_overrides(redis_url=own_redis.url)

    async def main() -> float:
        async with AsyncRelay.from_env(own) as relay:
            records = relay.job("frozen").arecords(timeout=3)
            await anext(records), await anext(records)
            assert own_redis.pid is not None
            os.kill(own_redis.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(StreamTimeoutError):
                await anext(records)
            return time.monotonic() - started

    try:
        assert asyncio.run(main()) < 3.5
    finally:
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGCONT)
        client.close()
