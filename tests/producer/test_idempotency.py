"""Idempotent submission: one key is one job, from any number of submitters, at any stage."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from redis import Redis
from support.scripts import ScriptedLLM
from support.waiting import wait_until
from support.workers import Workers

from tokenrelay import InvalidRequestError, JobState, Relay, Settings
from tokenrelay.connection import connect
from tokenrelay.stream.keys import idempotency
from tokenrelay.stream.protocol import Event, parse_event


def submitted_events(client: Redis) -> list[str]:
    """The job ids of every `submitted` lifecycle event."""
    events = [parse_event(fields) for _, fields in client.xrange("tokenrelay:events")]
    return [e.job_id for e in events if e.event == Event.SUBMITTED]


def test_concurrent_submitters_of_one_key_get_one_job(
    redis_client: Redis, settings: Settings, redis_url: str, env: dict[str, str]
) -> None:
    """Eight processes and eight threads race with each key: all get the same job, queued once."""
    for round_ in range(5):
        key = f"order-{round_}"
        command = [sys.executable, "-m", "tokenrelay", "submit", "--idempotency-key", key, "hi"]
        processes = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(8)
        ]
        ids: list[str] = []
        barrier = threading.Barrier(8)

        def submit(
            key: str = key, barrier: threading.Barrier = barrier, ids: list[str] = ids
        ) -> None:
            relay = Relay(connect(redis_url), settings)
            barrier.wait(timeout=10)
            try:
                ids.append(relay.submit("hi", idempotency_key=key).job_id)
            finally:
                relay.close()

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            ids.append(out.decode().strip())
        assert len(ids) == 16
        assert len(set(ids)) == 1
    queue = Relay(redis_client, settings).queue
    assert queue.count == 5
    assert len(submitted_events(redis_client)) == 5


def test_a_key_returns_its_job_while_queued_running_and_over(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Whatever stage the first job reached, the same key gives back that job, not a new one."""
    model = llm.script([" a", " b", " c"], stall_after=1)
    first = relay.submit("hi", model=model, idempotency_key="k-1")
    assert first.status() is JobState.QUEUED
    assert relay.submit("hi", model=model, idempotency_key="k-1").job_id == first.job_id
    workers.start()
    assert llm.server.wait_stalled(30), "the job never got going"
    assert first.status() is JobState.STARTED
    assert relay.submit("hi", model=model, idempotency_key="k-1").job_id == first.job_id
    llm.server.release()
    assert first.text(timeout=30) == " a b c"
    again = relay.submit("hi", model=model, idempotency_key="k-1")
    assert again.job_id == first.job_id
    assert again.status() is JobState.FINISHED
    assert relay.queue.count == 0


def test_one_key_for_a_different_request_is_refused(relay: Relay) -> None:
    """The key names one request: reusing it for another is an error, not the other's job."""
    relay.submit("hi", idempotency_key="k-2")
    with pytest.raises(InvalidRequestError, match="already used for a different request"):
        relay.submit("something else", idempotency_key="k-2")
    with pytest.raises(InvalidRequestError, match="already used for job"):
        relay.submit("hi", idempotency_key="k-2", job_id="my-own-id")


def test_a_batch_with_a_repeated_key_queues_one_job_for_it(
    relay: Relay, redis_client: Redis
) -> None:
    """Items with one key are one job; their handles repeat; a later submit joins it too."""
    handles = relay.submit_many(
        [
            {"prompt": "one", "idempotency_key": "k-3"},
            {"prompt": "two"},
            {"prompt": "one", "idempotency_key": "k-3"},
        ]
    )
    assert handles[0].job_id == handles[2].job_id != handles[1].job_id
    assert relay.submit("one", idempotency_key="k-3").job_id == handles[0].job_id
    assert relay.queue.count == 2
    assert len(submitted_events(redis_client)) == 2


def test_after_the_window_the_key_queues_a_new_job(
    redis_client: Redis, env: dict[str, str]
) -> None:
    """The record lasts TOKENRELAY_IDEMPOTENCY_WINDOW seconds from the first submit."""
    relay = Relay(redis_client, Settings.from_env({**env, "TOKENRELAY_IDEMPOTENCY_WINDOW": "1"}))
    first = relay.submit("hi", idempotency_key="k-4")
    assert 0 < redis_client.ttl(idempotency("k-4")) <= 1
    wait_until(lambda: not redis_client.exists(idempotency("k-4")), what="the window closes")
    assert relay.submit("hi", idempotency_key="k-4").job_id != first.job_id


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, "tab\there", "é"])
def test_a_malformed_key_is_refused_before_anything_is_queued(
    relay: Relay, redis_client: Redis, key: str
) -> None:
    """A key is 1 to 200 printable ASCII characters without spaces."""
    with pytest.raises(InvalidRequestError, match="idempotency_key"):
        relay.submit("hi", idempotency_key=key)
    assert redis_client.dbsize() == 0
