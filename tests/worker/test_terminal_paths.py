"""Every way a job can end leaves exactly one terminal entry in its stream, and RQ agrees.

Each fault is the real thing: a server error, a cut connection, a job timeout, a
SIGKILLed work horse, a SIGKILLed worker found abandoned, a stop command, a cancel.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from redis import Redis
from rq.command import send_stop_job_command
from rq.serializers import JSONSerializer
from support.scripts import ScriptedLLM
from support.streams import rq_status, terminal_entries
from support.workers import WorkerProcess, Workers

from tokenrelay import EndEntry, ErrorEntry, Event, JobHandle, JobState, Relay, Settings, TokenEntry
from tokenrelay.stream.protocol import parse_event
from tokenrelay.worker.runner import RelayJob, RelayWorker

WORDS = [f" w{i}" for i in range(20)]


def the_error(client: Redis, handle: JobHandle) -> ErrorEntry:
    """The job's one terminal entry, which must be an error."""
    [entry] = terminal_entries(client, handle.job_id)
    assert isinstance(entry, ErrorEntry)
    return entry


def wait_for_tokens(handle: JobHandle, count: int) -> None:
    """Block until the job has published `count` tokens."""
    for _, entry in handle.records(timeout=30):
        if isinstance(entry, TokenEntry) and entry.seq == count - 1:
            return
    raise AssertionError(f"the stream ended before {count} tokens")


def lifecycle(client: Redis, job_id: str) -> list[Event]:
    """The job's lifecycle events, in order."""
    events = [parse_event(fields) for _, fields in client.xrange("tokenrelay:events")]
    return [e.event for e in events if e.job_id == job_id]


def test_success_ends_with_one_end_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A clean generation ends with `end`, and RQ marks the job finished."""
    handle = relay.submit("hi", model=llm.script(WORDS))
    workers.run_burst()
    [entry] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(entry, EndEntry)
    assert rq_status(redis_client, handle.job_id) == "finished"


def test_a_model_error_ends_with_one_retryable_error_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """An HTTP 500 from the model becomes an `error` entry marked retryable; RQ says failed."""
    handle = relay.submit("hi", model=llm.script(status=500))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert (error.error_type, error.retryable, error.attempt) == ("OpenAIAPIError", True, 1)
    assert "scripted failure" in error.message
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_an_unknown_model_is_an_error_that_is_not_retryable(
    relay: Relay, workers: Workers, redis_client: Redis
) -> None:
    """A 404 for the model will not fix itself, so the error says not to retry."""
    handle = relay.submit("hi", model="no-such-model")
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert not error.retryable
    assert "does not exist" in error.message


def test_a_stream_cut_before_its_finish_reason_is_an_error_not_a_success(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A response that ends without a finish reason was cut short: `error`, never `end`."""
    handle = relay.submit("hi", model=llm.script(["a", "b", "c"], fault="cut"))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "TruncatedStreamError"
    assert error.retryable
    texts = [e.text for _, e in handle.records(timeout=5) if isinstance(e, TokenEntry)]
    assert texts == ["a", "b", "c"]
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_a_dropped_connection_is_an_error(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A connection that breaks mid-stream ends the job with a retryable `error`."""
    handle = relay.submit("hi", model=llm.script(["a", "b"], fault="drop"))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "OpenAIConnectionError"
    assert error.retryable
    assert error.message.startswith("Connection error talking to the model server at http://")
    assert "RemoteProtocolError" in error.message  # what actually happened to the connection


def test_a_job_timeout_ends_with_one_error_entry(
    redis_client: Redis, settings: Settings, llm: ScriptedLLM, workers: Workers
) -> None:
    """A generation that outlives its job timeout is ended by RQ and gets a timeout `error`."""
    relay = Relay(redis_client, settings.with_overrides(job_timeout=2))
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "JobTimeoutException"
    assert error.retryable
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_a_killed_work_horse_ends_its_job_with_one_error_and_the_worker_goes_on(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """SIGKILL of the job's process: one `error` entry, and the worker takes the next job."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start()
    wait_for_tokens(handle, 3)
    os.kill(worker.horse_pid(), signal.SIGKILL)
    error = the_error_eventually(redis_client, handle)
    assert error.error_type == "WorkHorseKilled"
    assert "killed by signal 9" in error.message
    assert error.retryable
    wait_for_rq_status(redis_client, handle.job_id, "failed")
    after = relay.submit("next", model=llm.script(["fine"]))
    assert after.text(timeout=30) == "fine"


def test_a_killed_worker_leaves_an_abandoned_job_that_the_cleanup_ends(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, settings: Settings
) -> None:
    """SIGKILL of the whole worker: RQ's abandoned-job cleanup writes the one `error` entry."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start()
    wait_for_tokens(handle, 3)
    horse = worker.horse_pid()
    worker.signal(signal.SIGKILL)
    worker.wait()
    os.kill(horse, signal.SIGKILL)
    assert terminal_entries(redis_client, handle.job_id) == []
    assert handle.status() is JobState.STARTED
    # The dead worker's heartbeat lapses after a minute and a half; make that time pass.
    wip = "rq:wip:tokenrelay"
    redis_client.zadd(wip, dict.fromkeys(redis_client.zrange(wip, 0, -1), time.time() - 1))
    live = RelayWorker(["tokenrelay"], connection=redis_client, settings=settings)
    assert all(queue.job_class is RelayJob for queue in live.queues)  # the clean-up's job class
    live.clean_registries()  # a live worker's periodic maintenance
    error = the_error(redis_client, handle)
    assert error.error_type == "AbandonedJobError"
    assert error.message == "the worker running the job died or vanished (its heartbeat lapsed)"
    assert error.retryable
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_a_stop_command_ends_the_job_with_one_error_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """RQ's stop-job command kills the horse; the stopped callback writes the `error`."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.start()
    wait_for_tokens(handle, 3)
    send_stop_job_command(redis_client, handle.job_id, serializer=JSONSerializer)
    error = the_error_eventually(redis_client, handle)
    assert (error.error_type, error.retryable) == ("JobStopped", False)
    wait_for_rq_status(redis_client, handle.job_id, "stopped")


def test_cancelling_a_running_job_stops_it_with_one_cancelled_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """cancel() ends the stream at once and stops the work horse; nothing is written after."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.start()
    wait_for_tokens(handle, 3)
    assert handle.cancel()
    assert the_error(redis_client, handle).error_type == "cancelled"
    wait_for_rq_status(redis_client, handle.job_id, "stopped")
    assert the_error(redis_client, handle).error_type == "cancelled"
    assert handle.status() is JobState.CANCELLED
    assert lifecycle(redis_client, handle.job_id)[-1] is Event.CANCELLED
    assert not handle.cancel()


def test_cancelling_a_queued_job_means_it_never_runs(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A job cancelled before a worker took it has only its `cancelled` entry, and never starts."""
    handle = relay.submit("hi", model=llm.script(WORDS))
    assert handle.cancel()
    workers.run_burst()
    [only] = list(handle.records(timeout=5))
    assert isinstance(only.entry, ErrorEntry)
    assert only.entry.error_type == "cancelled"
    assert rq_status(redis_client, handle.job_id) == "canceled"
    assert lifecycle(redis_client, handle.job_id) == [Event.SUBMITTED, Event.CANCELLED]
    job_ttl = redis_client.ttl(f"rq:job:{handle.job_id}")  # RQ alone would keep it forever
    assert 0 < job_ttl <= relay.settings.stream_ttl


def test_a_warm_shutdown_finishes_the_running_job(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, llm_server: object
) -> None:
    """One SIGTERM lets the current generation finish, then the worker exits cleanly."""
    handle = relay.submit("hi", model=llm.script(WORDS, token_delay=0.02))
    worker = workers.start()
    wait_for_tokens(handle, 1)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    [entry] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(entry, EndEntry)
    assert handle.text(timeout=5) == "".join(WORDS)


def test_a_cold_shutdown_ends_the_running_job_with_one_error(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A second SIGTERM kills the running job; its stream gets a `WorkerShutdown` error."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start()
    wait_for_tokens(handle, 3)
    worker.signal(signal.SIGTERM)
    wait_for_log(worker, "warm shut down requested")
    time.sleep(1.1)  # RQ ignores a second signal within 1 s of the first, as a duplicate
    worker.signal(signal.SIGTERM)
    worker.wait(timeout=30)
    error = the_error(redis_client, handle)
    assert (error.error_type, error.retryable) == ("WorkerShutdown", True)


def the_error_eventually(client: Redis, handle: JobHandle) -> ErrorEntry:
    """The job's error entry, once a reader sees it (a hook in another process writes it)."""
    *_, last = handle.records(timeout=30)
    assert isinstance(last.entry, ErrorEntry)
    return the_error(client, handle)


def wait_for_rq_status(client: Redis, job_id: str, status: str, timeout: float = 30) -> None:
    """Poll RQ's job status until it is `status` (RQ's own bookkeeping has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while rq_status(client, job_id) != status:
        assert time.monotonic() < deadline, f"job {job_id} is {rq_status(client, job_id)}"
        time.sleep(0.05)


def wait_for_log(worker: WorkerProcess, text: str, timeout: float = 30) -> None:
    """Poll the worker's log until a line contains `text`."""
    deadline = time.monotonic() + timeout
    while not any(text in line["event"] for line in worker.logs()):
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.05)


def test_an_api_key_quoted_back_by_the_server_is_redacted_everywhere(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A server that repeats the key in its error: not in the entry, the logs, or RQ's record."""
    from rq.job import Job
    from support.scripts import SECRET_KEY

    model = llm.script(status=401, error_message="Incorrect API key provided: {api_key}")
    handle = relay.submit("hi", model=model)
    worker = workers.run_burst()
    error = the_error(redis_client, handle)
    assert "Incorrect API key provided: **********" in error.message
    assert SECRET_KEY not in error.message
    assert SECRET_KEY not in worker.log_path.read_text()
    failed = [line for line in worker.logs() if line["event"] == "job.failed"]
    assert "Traceback" in failed[0]["exception"]  # operators still get the traceback
    result = Job.fetch(handle.job_id, connection=redis_client, serializer=JSONSerializer)
    stored = result.latest_result()
    assert stored is not None
    assert SECRET_KEY not in str(stored.exc_string)
    assert "GenerationError" in str(stored.exc_string)


def test_cancelling_a_finished_job_changes_nothing(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """cancel() of a job that ended says so and leaves its stream and RQ status alone."""
    handle = relay.submit("hi", model=llm.script(["done"]))
    workers.run_burst()
    assert not handle.cancel()
    assert rq_status(redis_client, handle.job_id) == "finished"
    assert [type(e) for e in terminal_entries(redis_client, handle.job_id)] == [EndEntry]


def test_reading_a_job_that_does_not_exist_fails_at_once(relay: Relay) -> None:
    """tokens(), text() and records() of an unknown id raise instead of waiting forever."""
    from tokenrelay import JobNotFoundError

    ghost = relay.job("never-submitted")
    with pytest.raises(JobNotFoundError, match="no job 'never-submitted'"):
        ghost.text()
    with pytest.raises(JobNotFoundError):
        next(ghost.tokens())
