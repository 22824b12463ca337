"""A worker runs tokenrelay's generation function and nothing else a payload names."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from support.workers import Workers


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
