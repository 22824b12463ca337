"""A write whose reply was lost is sent again, and Redis applies it once.

A real proxy in front of the test's Redis cuts the connection after Redis ran a command and
before its reply came back; redis-py sends the command again on a new connection, as it does
after any broken connection. Every script that writes a stream, a lease or a state, and the
producer's and the consumers' transactions, must recognise their own earlier write.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from support.lossy_proxy import LossyProxy

from tokenrelay import Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream import keys, lease_scripts, scripts
from tokenrelay.stream.keys import StateField
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    Policy,
    StartEntry,
    State,
    StatusEntry,
    TokenEntry,
    records,
)
from tokenrelay.stream.writer import terminal_event

JOB = "lost-replies"


@pytest.fixture
def proxy(own_redis: RedisServer) -> Iterator[LossyProxy]:
    with LossyProxy(own_redis.port) as lossy:
        yield lossy


@pytest.fixture
def direct(own_redis: RedisServer) -> Iterator[Redis]:
    client = connect(own_redis.url)
    yield client
    client.close()


@pytest.fixture
def through(proxy: LossyProxy) -> Iterator[Redis]:
    """A client whose replies go through the proxy."""
    client = connect(proxy.url)
    yield client
    client.close()


def run(client: Redis, script: scripts.Script, script_keys: list[str], args: list[str]) -> Any:
    client.script_load(script.source)
    return client.evalsha(script.sha, len(script_keys), *script_keys, *args)


def begin(client: Redis, writer: str = "w1") -> None:
    start = StartEntry(JOB, "m", 1, None, 1.0, "worker", 10, 2, writer)
    args = scripts.begin_args(start, ttl=60, queue="q", events_cap=1000, lease_ms=60_000)
    run(client, scripts.BEGIN, scripts.with_events(JOB), args)


def append(client: Redis, seq: int, writer: str = "w1") -> Any:
    args = scripts.append_args(writer, TokenEntry(seq, f" t{seq}"))
    return run(client, scripts.APPEND, scripts.stream_keys(JOB), args)


def entries(client: Redis) -> list[Any]:
    return [r.entry for r in records(client.xrange(keys.token_stream(JOB)))]


def state(client: Redis, field: StateField) -> str | None:
    raw = client.hget(keys.stream_state(JOB), field.value)
    return raw.decode() if raw else None


def lose(proxy: LossyProxy, script: scripts.Script) -> None:
    proxy.lose_reply_to(script.sha.encode())


def test_a_begin_sent_again_writes_one_start(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """The writer's own `start` is recognised: one entry, one `started` event."""
    direct.script_load(scripts.BEGIN.source)
    lose(proxy, scripts.BEGIN)
    begin(through)
    assert proxy.lost.is_set()
    assert [type(e) for e in entries(direct)] == [StartEntry]
    assert direct.xlen(keys.EVENTS_STREAM) == 1


def test_a_token_append_sent_again_writes_one_entry(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """The append of `seq` 0 sent twice leaves one token entry, and `seq` 1 comes next."""
    begin(direct)
    direct.script_load(scripts.APPEND.source)
    lose(proxy, scripts.APPEND)
    append(through, 0)
    assert proxy.lost.is_set()
    assert [type(e) for e in entries(direct)] == [StartEntry, TokenEntry]
    assert state(direct, StateField.NEXT_SEQ) == "1"


def test_an_attempt_sent_again_writes_one_entry_and_counts_once(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """A new attempt's entry, and the tokens of the attempt before, are written once."""
    begin(direct)
    for seq in range(3):
        append(direct, seq)
    direct.script_load(scripts.ATTEMPT.source)
    lose(proxy, scripts.ATTEMPT)
    entry = AttemptEntry(2, "OpenAIConnectionError", Policy.CONTINUE, 3)
    run(
        through,
        scripts.ATTEMPT,
        scripts.stream_keys(JOB),
        scripts.attempt_args("w1", entry, streamed=3),
    )
    assert proxy.lost.is_set()
    assert [e for e in entries(direct) if isinstance(e, AttemptEntry)] == [entry]
    assert state(direct, StateField.COMPLETION_TOKENS) == "3"


def test_a_status_sent_again_writes_one_entry(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """`retrying` said once, however many times its write was sent."""
    begin(direct)
    direct.script_load(scripts.STATUS.source)
    lose(proxy, scripts.STATUS)
    entry = StatusEntry(State.RETRYING, "a dropped connection", 1000.0)
    run(
        through,
        scripts.STATUS,
        scripts.stream_keys(JOB),
        scripts.status_args("w1", entry, nonce="n1"),
    )
    assert proxy.lost.is_set()
    assert [e for e in entries(direct) if isinstance(e, StatusEntry)] == [entry]


def test_a_close_sent_again_writes_one_terminal_entry_and_one_event(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """The close's nonce recognises the entry it wrote."""
    begin(direct)
    direct.script_load(scripts.CLOSE.source)
    end = EndEntry("stop", 0)
    event = terminal_event(JOB, end, "q", "m")
    args = scripts.close_args(end, event, writer="w1", nonce="c1", ttl=60, events_cap=1000)
    lose(proxy, scripts.CLOSE)
    assert run(through, scripts.CLOSE, scripts.with_events(JOB), args) is not None
    assert proxy.lost.is_set()
    assert [type(e) for e in entries(direct)] == [StartEntry, EndEntry]
    assert direct.xlen(keys.EVENTS_STREAM) == 2  # started, finished


def test_a_claim_sent_again_returns_the_same_claim_and_counts_one_attempt(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """A takeover whose reply was lost still takes the job over, once."""
    begin(direct)
    for seq in range(5):
        append(direct, seq)
    direct.zadd(keys.LEASES, {JOB: 1})  # lapsed long ago
    direct.script_load(lease_scripts.CLAIM.source)
    lose(proxy, lease_scripts.CLAIM)
    args = lease_scripts.claim_args(JOB, grace_ms=0, writer="w2", lease_ms=60_000)
    reply = run(through, lease_scripts.CLAIM, lease_scripts.lease_keys(JOB), args)
    assert proxy.lost.is_set()
    assert [int(v) for v in reply[:3]] == [2, 5, 5]  # attempt 2, from seq 5, 5 streamed
    assert state(direct, StateField.WRITER) == "w2"
    assert state(direct, StateField.ATTEMPT) == "2"
    assert len([e for e in entries(direct) if isinstance(e, StatusEntry)]) == 1


def test_two_claims_without_an_attempt_between_count_the_streamed_tokens_once(
    direct: Redis,
) -> None:
    """A claimer that dies before writing its attempt entry: the next claim adds nothing."""
    begin(direct)
    for seq in range(5):
        append(direct, seq)
    for writer in ("w2", "w3"):
        direct.zadd(keys.LEASES, {JOB: 1})
        args = lease_scripts.claim_args(JOB, grace_ms=0, writer=writer, lease_ms=60_000)
        run(direct, lease_scripts.CLAIM, lease_scripts.lease_keys(JOB), args)
    assert state(direct, StateField.COMPLETION_TOKENS) == "5"
    assert state(direct, StateField.ATTEMPT) == "3"


def test_a_submit_whose_commit_reply_was_lost_queues_its_job_once(
    proxy: LossyProxy, direct: Redis, through: Redis, env: dict[str, str]
) -> None:
    """The producer recognises its own commit, with or without a job id of the caller's."""
    relay = Relay(through, Settings.from_env(env))
    for job_id in (None, "chosen-id"):
        proxy.lose_reply_to(b"EXEC")
        handle = relay.submit("hi", job_id=job_id)
        assert proxy.lost.is_set()
        assert handle.job_id == (job_id or handle.job_id)
    queued = direct.lrange("rq:queue:tokenrelay", 0, -1)
    assert len(queued) == 2
    assert direct.xlen(keys.EVENTS_STREAM) == 2


def test_a_consumer_groups_commit_whose_reply_was_lost_is_applied_once(
    proxy: LossyProxy, direct: Redis, through: Redis
) -> None:
    """An event's writes and its acknowledgement, in one transaction, count once."""
    from tokenrelay.consumer.group import Delivery, GroupConsumer
    from tokenrelay.stream.events import emit
    from tokenrelay.stream.protocol import Event, LifecycleEvent

    emit(direct, LifecycleEvent(Event.SUBMITTED, "j1", 1.0, "q", "m"), cap=1000)
    consumer = GroupConsumer(through, "counting", "c1")

    def count(delivery: Delivery, pipe: Any) -> None:
        pipe.hincrby("tokenrelay:test:counts", delivery.event.job_id, 1)

    proxy.lose_reply_to(b"EXEC")
    assert consumer.run_until_idle(count) == 1
    assert proxy.lost.is_set()
    assert consumer.run_until_idle(count) == 0  # acknowledged: nothing left to do
    assert direct.hget("tokenrelay:test:counts", "j1") == b"1"
    assert direct.xpending(keys.EVENTS_STREAM, "counting")["pending"] == 0
