"""Readers wait with deadlines: a frozen or vanished stream ends the read, and pools are bounded."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from tokenrelay import Relay, Settings, StartEntry, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.errors import RedisUnavailableError, StreamExpiredError, StreamTimeoutError
from tokenrelay.stream.keys import stream_state, token_stream
from tokenrelay.stream.reader import read_stream
from tokenrelay.stream.writer import StreamWriter


def begun(client: Redis, job_id: str) -> StreamWriter:
    """A writer that has written the job's `start` entry and one token."""
    writer = StreamWriter(client, job_id, ttl=600)
    writer.start(StartEntry(job_id, "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token))
    writer.token("first")
    return writer


@pytest.fixture
def frozen_client(own_redis: RedisServer) -> Iterator[Redis]:
    """A client of a Redis that is resumed (SIGCONT) after the test, whatever it did to it."""
    client = connect(own_redis.url)
    yield client
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGCONT)
    client.close()


def test_a_reader_timeout_holds_against_a_frozen_redis(
    own_redis: RedisServer, frozen_client: Redis
) -> None:
    """With Redis stopped (SIGSTOP) mid-read, `timeout=` still ends the read on time."""
    begun(frozen_client, "frozen")
    records = read_stream(frozen_client, "frozen", timeout=3)
    assert isinstance(next(records).entry, StartEntry)
    assert isinstance(next(records).entry, TokenEntry)
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(StreamTimeoutError):
        next(records)
    assert time.monotonic() - started < 3.5


def test_a_stream_that_disappears_under_its_reader_ends_the_read(redis_client: Redis) -> None:
    """A stream deleted (or expired) while a reader waits is reported, not waited on forever."""
    begun(redis_client, "vanishing")
    records = read_stream(redis_client, "vanishing")
    next(records), next(records)
    redis_client.delete(token_stream("vanishing"), stream_state("vanishing"))
    with pytest.raises(StreamExpiredError, match="is gone: it expired or was deleted"):
        next(records)


def test_three_hundred_readers_through_one_relay_all_read_the_whole_stream(
    redis_client: Redis, settings: Settings, redis_url: str
) -> None:
    """Hundreds of threads following one job through one Relay each get every token."""
    relay = Relay.from_env(settings)
    writer = begun(redis_client, "popular")
    readers, texts, errors = 300, [], []
    ready = threading.Barrier(readers + 1)

    def follow() -> None:
        try:
            records = relay.job("popular").records(timeout=60)
            ready.wait(timeout=30)
            texts.append("".join(r.entry.text for r in records if isinstance(r.entry, TokenEntry)))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=follow) for _ in range(readers)]
    for thread in threads:
        thread.start()
    ready.wait(timeout=30)
    for i in range(20):
        writer.token(f" {i}")
    from tokenrelay import EndEntry

    writer.close(EndEntry("stop", 21))
    for thread in threads:
        thread.join(timeout=60)
    relay.close()
    assert errors == []
    assert texts == ["first" + "".join(f" {i}" for i in range(20))] * readers


def test_a_relay_out_of_connections_says_so(redis_client: Redis, settings: Settings) -> None:
    """Past its connection bound, a Relay names what is exhausted instead of 'Too many'."""
    relay = Relay.from_env(settings.with_overrides(redis_max_connections=2))
    writer = begun(redis_client, "busy")
    held = [relay.job("busy").records(timeout=30) for _ in range(2)]
    for records in held:
        next(records)  # each holds a connection while it follows the stream
    with pytest.raises(RedisUnavailableError, match="all 2 connections of this client are in use"):
        next(relay.job("busy").records(timeout=30))
    writer.token("more")
    for records in held:
        records.close()
    relay.close()


def test_a_fresh_reader_of_a_frozen_redis_still_times_out_on_time(
    own_redis: RedisServer, frozen_client: Redis, settings: Settings
) -> None:
    """A reader that starts (and connects) while Redis is stopped keeps its deadline too."""
    begun(frozen_client, "cold")
    with Relay(connect(own_redis.url, check=False), settings) as relay:  # not connected yet
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(StreamTimeoutError):
            relay.job("cold").result(timeout=2)
        assert time.monotonic() - started < 2.5


def test_resuming_after_the_terminal_entry_returns_at_once(redis_client: Redis) -> None:
    """A reader resuming from the last entry of an ended stream gets nothing, without waiting."""
    from tokenrelay import EndEntry

    writer = begun(redis_client, "done")
    assert writer.close(EndEntry("stop", 1))
    *_, end = read_stream(redis_client, "done", timeout=5)
    started = time.monotonic()
    assert list(read_stream(redis_client, "done", after=end.id)) == []
    assert time.monotonic() - started < 1
