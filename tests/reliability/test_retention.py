"""How long streams are kept, and what readers are told about what was not kept.

Streams of ended jobs expire after TOKENRELAY_STREAM_TTL; a running stream never expires
under its readers, however long it pauses; a stream with a length cap tells a reader that
fell behind its trimmed point which tokens it lost (a `gap`), instead of skipping them; and a
generation that outlives what a worker may hold during a Redis outage is continued, not lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from support.scripts import ScriptedLLM
from support.streams import terminal_entries, wait_for_tokens
from support.waiting import wait_until
from support.workers import Workers

from tokenrelay import EndEntry, JobNotFoundError, Relay, Settings, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.errors import StreamGapError
from tokenrelay.stream.keys import RECORDER_GROUP, Stat, consumer_stats
from tokenrelay.stream.protocol import AttemptEntry, GapEntry, StartEntry

WORDS = [f" w{i}" for i in range(60)]
TEXT = "".join(WORDS)


def relay_with(client: Redis, env: dict[str, str], **settings: str) -> Relay:
    return Relay(client, Settings.from_env({**env, **settings}))


def test_the_stream_of_an_ended_job_expires_after_its_ttl(
    redis_client: Redis, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """Kept TOKENRELAY_STREAM_TTL seconds after its last write, then gone, with its RQ job."""
    short = {"TOKENRELAY_STREAM_TTL": "3"}
    relay = relay_with(redis_client, env, **short)
    handle = relay.submit("hi", model=llm.script([" a", " b"]))
    workers.run_burst(env=short)
    assert handle.text(timeout=5) == " a b"
    assert 0 < redis_client.pttl(handle.stream_key) <= 3000
    wait_until(lambda: not redis_client.exists(handle.stream_key), what="the stream expires")
    with pytest.raises(JobNotFoundError):
        next(iter(handle.records(timeout=5)))


def test_a_running_stream_never_expires_under_its_readers(
    redis_client: Redis, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """A generation paused far longer than the stream's TTL keeps its stream, and ends whole."""
    short = {"TOKENRELAY_STREAM_TTL": "1", "TOKENRELAY_LEASE_TTL": "1.5"}
    relay = relay_with(redis_client, env, **short)
    handle = relay.submit("hi", model=llm.script(WORDS[:6], stall_after=3))
    workers.start(env={**short, "TOKENRELAY_STALL_TIMEOUT": "60"})
    assert llm.server.wait_stalled(30)
    paused_until = time.monotonic() + 4  # four TTLs without a token
    while time.monotonic() < paused_until:
        assert redis_client.exists(handle.stream_key), "the stream expired under its reader"
        time.sleep(0.05)
    llm.server.release()
    assert handle.text(timeout=30) == "".join(WORDS[:6])


def test_a_reader_behind_a_capped_streams_trimmed_point_is_told_of_the_gap(
    redis_client: Redis, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """With TOKENRELAY_STREAM_MAXLEN, a late reader gets a `gap` with the lost `seq` range."""
    capped = {"TOKENRELAY_STREAM_MAXLEN": "100", "TOKENRELAY_TOKENS_PER_ENTRY": "1"}
    relay = relay_with(redis_client, env, **capped)
    words = [f" t{i}" for i in range(400)]
    handle = relay.submit("hi", model=llm.script(words), max_tokens=400)
    workers.run_burst(env=capped)

    records = list(handle.records(timeout=10))
    assert not any(isinstance(r.entry, StartEntry) for r in records)  # trimmed with the rest
    gap = records[0].entry
    assert isinstance(gap, GapEntry)
    tokens = [r.entry for r in records if isinstance(r.entry, TokenEntry)]
    assert gap.first_seq == 0
    assert gap.last_seq == tokens[0].seq - 1
    assert 100 <= len(tokens) < 400
    assert "".join(t.text for t in tokens) == "".join(words[gap.last_seq + 1 :])
    assert isinstance(records[-1].entry, EndEntry)
    with pytest.raises(StreamGapError, match=rf"tokens 0 to {gap.last_seq} were trimmed"):
        handle.result(timeout=10)
    with pytest.raises(StreamGapError):
        list(handle.tokens(timeout=10))


def test_the_recorder_counts_a_stream_that_lost_tokens_to_its_cap(
    redis_client: Redis,
    env: dict[str, str],
    llm: ScriptedLLM,
    workers: Workers,
    tmp_path: Path,
) -> None:
    """A transcript of a capped stream is not passed off as whole: the gap is counted."""
    capped = {"TOKENRELAY_STREAM_MAXLEN": "100", "TOKENRELAY_TOKENS_PER_ENTRY": "1"}
    relay = relay_with(redis_client, env, **capped)
    relay.submit("hi", model=llm.script([f" t{i}" for i in range(400)]), max_tokens=400)
    workers.run_burst(env=capped)
    recorder = workers.command("record", "--dir", str(tmp_path), "--once", "--claim-after", "0")
    assert recorder.wait(60) == 0, recorder.log_path.read_text()
    gapped = redis_client.hget(consumer_stats(RECORDER_GROUP), Stat.STREAMS_GAPPED.value)
    assert gapped == b"1"


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps its data across a restart (AOF)."""
    with RedisServer(appendonly=True) as server:
        yield server


def test_a_generation_that_outlives_what_an_outage_may_hold_back_is_continued(
    request: pytest.FixtureRequest,
    persistent_redis: RedisServer,
    env: dict[str, str],
    llm: ScriptedLLM,
    workers: Workers,
) -> None:
    """Past TOKENRELAY_MAX_HELD_TOKENS during an outage the attempt ends; once Redis is back
    its held tokens are written and the next attempt goes on from them."""
    env["TOKENRELAY_REDIS_URL"] = workers.env["TOKENRELAY_REDIS_URL"] = persistent_redis.url
    client = connect(persistent_redis.url)
    request.addfinalizer(client.close)
    relay = Relay(client, Settings.from_env(env))
    handle = relay.submit("hi", model=llm.script(WORDS, token_delay=0.05))
    workers.start(env={"TOKENRELAY_MAX_HELD_TOKENS": "10", "TOKENRELAY_RETRY_DELAY": "0.05"})
    wait_for_tokens(handle, 5)
    persistent_redis.stop(keep_data=True)
    time.sleep(3)  # the outage itself; the model streams on meanwhile, past the bound
    persistent_redis.start()

    assert handle.text(timeout=60) == TEXT
    [attempt] = [r.entry for r in handle.records(timeout=5) if isinstance(r.entry, AttemptEntry)]
    assert attempt.reason == "BacklogError"
    assert attempt.from_seq >= 15  # what was written before, and the ten held back
    assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]
