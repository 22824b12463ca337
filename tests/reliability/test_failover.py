"""A Redis that answers but cannot serve for a while is an outage, not a refusal.

A primary demoted to a read-only replica (what a failover does to the old primary) answers
every write with READONLY; a Redis running a long script answers with BUSY. Both pass: the
worker holds its tokens, writes them when Redis serves again, and the text is whole. A slow
network that delays one job's `start` beyond a lease renewal does not end the job either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing

import pytest
from redis import Redis
from support.lossy_proxy import LossyProxy
from support.scripts import ScriptedLLM
from support.streams import rq_status, terminal_entries, wait_for_tokens
from support.waiting import wait_until
from support.workers import Workers

from tokenrelay import EndEntry, Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.dev.processes import free_port
from tokenrelay.dev.redis_server import RedisServer
from tokenrelay.stream import scripts

WORDS = [f" w{i}" for i in range(40)]
TEXT = "".join(WORDS)


@pytest.fixture
def client(own_redis: RedisServer, env: dict[str, str], workers: Workers) -> Iterator[Redis]:
    """The test's processes on a Redis of the test's own."""
    env["TOKENRELAY_REDIS_URL"] = workers.env["TOKENRELAY_REDIS_URL"] = own_redis.url
    redis = connect(own_redis.url)
    yield redis
    redis.close()


def test_a_primary_demoted_to_a_replica_for_a_while_delays_the_text_but_loses_nothing(
    client: Redis, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """READONLY replies while it follows a primary that is not there; then it is promoted."""
    handle = Relay(client, Settings.from_env(env)).submit(
        "tell me", model=llm.script(WORDS, token_delay=0.05)
    )
    workers.start()
    wait_for_tokens(handle, 5)
    client.replicaof("127.0.0.1", free_port())  # nobody there: it stays read-only, data kept
    time.sleep(2)  # the failover: every write meanwhile is refused
    client.replicaof("NO", "ONE")
    assert handle.text(timeout=60) == TEXT
    assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]


def test_a_redis_busy_with_a_long_script_delays_the_text_but_loses_nothing(
    client: Redis, own_redis: RedisServer, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """BUSY replies while a script runs past the busy threshold; then it is killed."""
    client.config_set("busy-reply-threshold", 100)
    handle = Relay(client, Settings.from_env(env)).submit(
        "tell me", model=llm.script(WORDS, token_delay=0.05)
    )
    workers.start()
    wait_for_tokens(handle, 5)
    busy = connect(own_redis.url, check=False)
    spin = "local t0 = redis.call('TIME')[1] while redis.call('TIME')[1] - t0 < 2 do end return 1"
    script = threading.Thread(target=busy.eval, args=(spin, 0), daemon=True)
    script.start()  # two seconds of BUSY for everyone else
    script.join(timeout=30)
    busy.close()
    assert handle.text(timeout=60) == TEXT
    assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]


def test_a_start_delayed_past_a_lease_renewal_does_not_end_the_job(
    own_redis: RedisServer, env: dict[str, str], llm: ScriptedLLM, workers: Workers
) -> None:
    """A renewal is only for a stream the worker holds: one still being begun is left alone."""
    with LossyProxy(own_redis.port) as proxy, closing(connect(own_redis.url)) as client:
        env["TOKENRELAY_REDIS_URL"] = workers.env["TOKENRELAY_REDIS_URL"] = proxy.url
        handle = Relay(client, Settings.from_env(env)).submit(
            "tell me", model=llm.script(WORDS[:10], token_delay=0.05)
        )
        proxy.hold(scripts.BEGIN.sha.encode(), 2.0)
        workers.start(env={"TOKENRELAY_LEASE_TTL": "1.5", "TOKENRELAY_TAKEOVER_AFTER": "0.5"})
        assert handle.text(timeout=60) == "".join(WORDS[:10])
        assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]
        wait_until(lambda: rq_status(client, handle.job_id) == "finished", what="RQ: finished")
