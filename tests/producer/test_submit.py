"""Submitting: bad input is refused with a clear message and nothing is queued."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from redis import Redis

from tokenrelay import InvalidRequestError, JobState, RedisUnavailableError, Relay, Settings
from tokenrelay.dev.processes import free_port
from tokenrelay.stream.protocol import Event, parse_event

BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "  \n\t"}, "the prompt is empty"),
    ({}, "give either a prompt or messages"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "exactly the keys role and content"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, "at least one non-blank user"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be between 1 and 32,768"),
    ({"prompt": "a", "max_tokens": -5}, "max_tokens must be between"),
    ({"prompt": "a", "max_tokens": 10**9}, "max_tokens must be between"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens must be an integer"),
    ({"prompt": "a", "temperature": -0.1}, "temperature must be between 0 and 2"),
    ({"prompt": "a", "temperature": 2.5}, "temperature must be between 0 and 2"),
    ({"prompt": "a", "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "a", "job_id": "has space"}, "job_id 'has space' is not allowed"),
    ({"prompt": "a", "job_id": "a:b"}, "is not allowed"),
    ({"prompt": "a", "job_id": "{tag}"}, "is not allowed"),
    ({"prompt": "a", "job_id": "x" * 129}, "is not allowed"),
    ({"prompt": "a", "model": "two words"}, "model must be a printable name without spaces"),
    ({"prompt": "a", "model": "evil\x1b[2J"}, "model must be a printable name"),
    ({"prompt": "a", "metadata": {"k": object()}}, "metadata must be JSON-serializable"),
    ({"prompt": "a", "metadata": {1: "v"}}, "string keys"),
    ({"prompt": "a", "metadata": {"k": "v" * 20_000}}, "the limit is 16,384"),
    ({"prompt": "bad \ud800 text"}, "lone surrogate at position 4"),
    ({"prompt": "a", "metadata": {"k": float("nan")}}, "metadata.'k' holds nan, which is not JSON"),
    ({"prompt": "a", "metadata": {"k": [float("inf")]}}, "holds inf, which is not JSON"),
    (
        {"prompt": "a", "job_id": "x" * 10_000},
        "job_id 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is not",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_REQUESTS)
def test_bad_input_is_refused_before_anything_is_queued(
    relay: Relay, redis_client: Redis, kwargs: dict[str, Any], message: str
) -> None:
    """Each kind of bad input raises InvalidRequestError naming the problem; Redis stays empty."""
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        relay.submit(**kwargs)
    assert redis_client.dbsize() == 0


def test_metadata_nested_thousands_deep_is_refused_without_a_recursion_error(
    relay: Relay, redis_client: Redis
) -> None:
    """Metadata nested 5,000 deep is a clear refusal, not a RecursionError from the JSON encoder."""
    deep: Any = "leaf"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match=r"metadata\.'k' nests deeper than 32 levels"):
        relay.submit("a", metadata={"k": deep})
    assert redis_client.dbsize() == 0


def test_a_prompt_over_the_size_limit_is_refused(redis_client: Redis, settings: Settings) -> None:
    """The prompt size limit is configurable and its message names the variable."""
    relay = Relay(redis_client, settings.with_overrides(max_prompt_chars=10))
    with pytest.raises(InvalidRequestError, match="11 characters; the limit is 10"):
        relay.submit("x" * 11)
    assert redis_client.dbsize() == 0


def test_one_bad_item_refuses_the_whole_batch(relay: Relay, redis_client: Redis) -> None:
    """A batch is checked as a whole: one bad item means none is queued, and it is named."""
    with pytest.raises(InvalidRequestError, match="item 2: the prompt is empty"):
        relay.submit_many(["one", {"prompt": "two"}, ""])
    assert redis_client.dbsize() == 0


def test_a_job_id_cannot_be_reused(relay: Relay) -> None:
    """A caller-chosen job id that exists is refused, so two jobs never share a stream."""
    relay.submit("first", job_id="my-job")
    with pytest.raises(InvalidRequestError, match="'my-job' is already in use"):
        relay.submit("second", job_id="my-job")
    with pytest.raises(InvalidRequestError, match="more than once"):
        relay.submit_many([{"prompt": "a", "job_id": "x"}, {"prompt": "b", "job_id": "x"}])


def test_an_unreachable_redis_is_named_without_a_traceback(settings: Settings) -> None:
    """Submitting to a Redis that is down says which URL failed."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailableError, match=r"cannot reach Redis at redis://:\*\*\*\*@127"):
        Relay.from_env(settings.with_overrides(redis_url=url))


def test_a_submitted_job_is_queued_with_its_caller_chosen_id_and_metadata(
    relay: Relay, redis_client: Redis
) -> None:
    """submit returns a handle on a queued job and records a `submitted` lifecycle entry."""
    handle = relay.submit(
        messages=[{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
        job_id="job-42",
        metadata={"user": "ada"},
        max_tokens=5,
        temperature=0,
    )
    assert handle.job_id == "job-42"
    assert handle.stream_key == "tokenrelay:{job-42}:tokens"
    assert handle.status() is JobState.QUEUED
    assert relay.queue.count == 1
    [(_, fields)] = redis_client.xrange("tokenrelay:events")
    event = parse_event(fields)
    assert (event.event, event.job_id, event.queue) == (Event.SUBMITTED, "job-42", "tokenrelay")


def test_jobs_carry_json_and_no_prompt_in_their_description(
    relay: Relay, redis_client: Redis
) -> None:
    """Jobs are stored as JSON, never pickle, and RQ's description does not repeat the prompt."""
    handle = relay.submit("the secret plan")
    raw = redis_client.hget(f"rq:job:{handle.job_id}", "data")
    assert raw is not None
    func, _, args, _ = json.loads(zlib.decompress(raw))  # RQ compresses the serialized data
    assert func == "tokenrelay.worker.generation.generate"
    assert args[0]["messages"] == [{"role": "user", "content": "the secret plan"}]
    description = redis_client.hget(f"rq:job:{handle.job_id}", "description")
    assert description is not None
    assert b"secret" not in description


def test_submit_many_pipelines_a_batch(relay: Relay, redis_client: Redis) -> None:
    """A batch of prompts is queued with progress reports, in chunks, in order."""
    seen: list[int] = []
    prompts = [f"prompt {i}" for i in range(25)]
    handles = relay.submit_many(prompts, chunk_size=10, progress=seen.append)
    assert seen == [10, 20, 25]
    assert relay.queue.count == 25
    assert relay.queue.job_ids == [h.job_id for h in handles]
    assert redis_client.xlen("tokenrelay:events") == 25


def test_one_job_id_submitted_concurrently_is_queued_once(
    redis_client: Redis, settings: Settings, redis_url: str
) -> None:
    """Many submitters racing with one id, from their own connections: exactly one succeeds."""
    import threading

    from tokenrelay.connection import connect

    rounds, submitters = 30, 8
    for round_ in range(rounds):
        job_id = f"contested-{round_}"
        outcomes: list[str] = []
        barrier = threading.Barrier(submitters)

        def submit(
            job_id: str = job_id,
            barrier: threading.Barrier = barrier,
            outcomes: list[str] = outcomes,
        ) -> None:
            relay = Relay(connect(redis_url), settings)
            barrier.wait(timeout=10)
            try:
                relay.submit("hi", job_id=job_id)
                outcomes.append("queued")
            except InvalidRequestError:
                outcomes.append("refused")
            finally:
                relay.close()

        threads = [threading.Thread(target=submit) for _ in range(submitters)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["queued"] + ["refused"] * (submitters - 1)
    queue = Relay(redis_client, settings).queue
    assert queue.count == rounds
    assert len(set(queue.job_ids)) == rounds


def test_a_batch_interrupted_by_a_taken_id_says_which_jobs_were_queued(
    relay: Relay, redis_client: Redis
) -> None:
    """Another submitter takes an id of a later chunk meanwhile: the queued jobs are handed back."""
    from tokenrelay.errors import BatchInterruptedError

    items = [{"prompt": f"p{i}", "job_id": f"b{i}"} for i in range(6)]

    def someone_else_takes_b4(queued: int) -> None:
        if queued == 3:
            relay.submit("theirs", job_id="b4")

    with pytest.raises(BatchInterruptedError, match="job id 'b4' is already in use") as caught:
        relay.submit_many(items, chunk_size=3, progress=someone_else_takes_b4)
    assert [h.job_id for h in caught.value.queued] == ["b0", "b1", "b2"]
    assert sorted(relay.queue.job_ids) == ["b0", "b1", "b2", "b4"]
