"""A worker runs tokenrelay's generation function and nothing else a payload names."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from support.scripts import ScriptedLLM
from support.streams import terminal_entries, tokens_in
from support.workers import Workers

from tokenrelay import Relay, StartEntry


def test_a_json_job_naming_another_callable_is_refused(
    redis_client: Redis, workers: Workers, tmp_path: Path
) -> None:
    """A job that names any other function fails without running it."""
    marker = tmp_path / "ran"
    queue = Queue("tokenrelay", connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue("pathlib.Path.touch", str(marker))
    workers.run_burst()
    job = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == "failed"
    assert not marker.exists()
    result = job.latest_result()
    assert result is not None
    assert "UnsafeJobError" in str(result.exc_string)
    assert "runs only tokenrelay.worker.generation.generate" in str(result.exc_string)


def test_a_pickled_job_is_never_unpickled(
    redis_client: Redis, workers: Workers, tmp_path: Path
) -> None:
    """A job serialized with pickle cannot be read by the JSON worker, so it never runs."""
    marker = tmp_path / "ran"
    pickled = Queue("tokenrelay", connection=redis_client)  # RQ's default serializer is pickle
    job = pickled.enqueue("pathlib.Path.touch", str(marker))
    workers.run_burst()
    assert not marker.exists()
    raw_status = redis_client.hget(job.key, "status")
    assert raw_status == b"failed"


def test_a_forged_payload_is_refused_with_an_error_entry_and_its_stream_kept(
    redis_client: Redis, workers: Workers
) -> None:
    """A job written straight into Redis gets the checks `submit` makes; RQ records the failure."""
    from support.streams import rq_status, terminal_entries

    from tokenrelay import ErrorEntry
    from tokenrelay.stream.keys import GENERATE_FUNC, token_stream

    queue = Queue("tokenrelay", connection=redis_client, serializer=JSONSerializer)
    forged = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10**9,
        "temperature": 99,
        "stream_ttl": -5,
    }
    job = queue.enqueue(GENERATE_FUNC, forged, job_id="forged")
    sane_but_huge = {**forged, "stream_ttl": 60}
    huge = queue.enqueue(GENERATE_FUNC, sane_but_huge, job_id="huge")
    workers.run_burst()
    for job_id, reason in ((job.id, "stream_ttl must be between 1"), (huge.id, "max_tokens")):
        [entry] = terminal_entries(redis_client, job_id)
        assert isinstance(entry, ErrorEntry)
        assert (entry.error_type, entry.retryable) == ("InvalidRequestError", False)
        assert reason in entry.message
        assert redis_client.ttl(token_stream(job_id)) > 0  # kept, with a sane expiry
        assert rq_status(redis_client, job_id) == "failed"


def test_one_job_taken_by_two_workers_streams_once(
    relay: Relay, llm: ScriptedLLM, redis_client: Redis, workers: Workers
) -> None:
    """A job id queued twice, taken by two workers at once: its stream is written once.

    The second worker finds the job started and leaves it; had both started it at the same
    moment, the stream's fence would refuse the second (`tests/stream/test_writer.py`).
    """
    words = [f" w{i}" for i in range(30)]
    handle = relay.submit("twice", model=llm.script(words, token_delay=0.01))
    redis_client.rpush("rq:queue:tokenrelay", handle.job_id)  # queued a second time
    pair = [workers.start(), workers.start()]
    assert handle.result(timeout=60).text == "".join(words)
    entries = [r.entry for r in handle.records(timeout=5)]  # checked: seq runs without gaps
    assert tokens_in(entries) == 30
    assert len(terminal_entries(redis_client, handle.job_id)) == 1
    assert sum(isinstance(e, StartEntry) for e in entries) == 1
    assert all(w.process.poll() is None for w in pair)  # neither worker was hurt by it
