"""Every way a job can end leaves exactly one terminal entry in its stream, and RQ agrees.

Each fault is the real thing (a server error, a cut connection, a job timeout, a stop
command, a cancel, a shutdown, a SIGKILLed worker), and each happens in a worker process
that is streaming other jobs at the same time: those finish untouched, unless the fault is
the worker's own end, which then ends every one of them.
"""

from __future__ import annotations

import signal
import time

import pytest
from redis import Redis
from rq.command import send_stop_job_command
from rq.serializers import JSONSerializer
from support.scripts import SECRET_KEY, ScriptedLLM
from support.streams import rq_status, terminal_entries, wait_for_tokens
from support.workers import WorkerProcess, Workers

from tokenrelay import (
    EndEntry,
    ErrorEntry,
    Event,
    JobHandle,
    JobState,
    Relay,
    Settings,
    TokenEntry,
)
from tokenrelay.dev.processes import free_port
from tokenrelay.outage import Outage
from tokenrelay.stream.protocol import parse_event
from tokenrelay.worker.rq_job import RelayJob
from tokenrelay.worker.rq_worker import RelayWorker

WORDS = [f" w{i}" for i in range(20)]
#: The neighbours' text: long enough, and paced, to be streaming while the fault happens.
NEIGHBOUR_WORDS = [f" n{i}" for i in range(40)]


def the_error(client: Redis, handle: JobHandle) -> ErrorEntry:
    """The job's one terminal entry, which must be an error."""
    [entry] = terminal_entries(client, handle.job_id)
    assert isinstance(entry, ErrorEntry)
    return entry


def the_error_eventually(client: Redis, handle: JobHandle) -> ErrorEntry:
    """The job's error entry, once a reader sees it (another task or process writes it)."""
    *_, last = handle.records(timeout=30)
    assert isinstance(last.entry, ErrorEntry)
    return the_error(client, handle)


def wait_for_rq_status(client: Redis, job_id: str, status: str, timeout: float = 30) -> None:
    """Poll RQ's job status until it is `status` (RQ's own bookkeeping has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while rq_status(client, job_id) != status:
        assert time.monotonic() < deadline, f"job {job_id} is {rq_status(client, job_id)}"
        time.sleep(0.05)


def wait_for_log(worker: WorkerProcess, event: str, timeout: float = 30) -> None:
    """Poll the worker's log until it has a line of this event."""
    deadline = time.monotonic() + timeout
    while not any(line["event"] == event for line in worker.logs()):
        assert time.monotonic() < deadline, f"no {event!r} in the worker's log"
        time.sleep(0.05)


def lifecycle(client: Redis, job_id: str) -> list[Event]:
    """The job's lifecycle events, in order."""
    events = [parse_event(fields) for _, fields in client.xrange("tokenrelay:events")]
    return [e.event for e in events if e.job_id == job_id]


@pytest.fixture
def neighbours(relay: Relay, llm: ScriptedLLM) -> list[JobHandle]:
    """Three jobs streaming in the same worker as the test's job (submitted first)."""
    model = llm.script(NEIGHBOUR_WORDS, token_delay=0.03)
    return [relay.submit(f"neighbour {i}", model=model) for i in range(3)]


@pytest.fixture
def held_neighbours(relay: Relay, llm: ScriptedLLM) -> list[JobHandle]:
    """Three jobs that stay mid-stream (stalled) until the test ends: for faults that end all."""
    model = llm.script(NEIGHBOUR_WORDS, stall_after=2)
    return [relay.submit(f"held {i}", model=model) for i in range(3)]


def assert_untouched(client: Redis, handles: list[JobHandle]) -> None:
    """Each neighbour streamed its whole text and ended once, with `end`."""
    for handle in handles:
        assert handle.text(timeout=60) == "".join(NEIGHBOUR_WORDS)
        assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]


def test_success_ends_with_one_end_entry(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """A clean generation ends with `end`, and RQ marks the job finished."""
    handle = relay.submit("hi", model=llm.script(WORDS))
    workers.run_burst()
    [entry] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(entry, EndEntry)
    assert rq_status(redis_client, handle.job_id) == "finished"
    assert_untouched(redis_client, neighbours)


def test_a_model_error_ends_with_one_retryable_error_entry(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """An HTTP 500 from the model becomes an `error` entry marked retryable; RQ says failed."""
    handle = relay.submit("hi", model=llm.script(status=500))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert (error.error_type, error.retryable, error.attempt) == ("OpenAIAPIError", True, 1)
    assert "scripted failure" in error.message
    assert rq_status(redis_client, handle.job_id) == "failed"
    assert_untouched(redis_client, neighbours)


def test_an_unknown_model_is_an_error_that_is_not_retryable(
    relay: Relay, workers: Workers, redis_client: Redis, neighbours: list[JobHandle]
) -> None:
    """A 404 for the model will not fix itself, so the error says not to retry."""
    handle = relay.submit("hi", model="no-such-model")
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert not error.retryable
    assert "does not exist" in error.message
    assert_untouched(redis_client, neighbours)


def test_a_stream_cut_before_its_finish_reason_is_an_error_not_a_success(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """A response that ends without a finish reason was cut short: `error`, never `end`."""
    handle = relay.submit("hi", model=llm.script(["a", "b", "c"], fault="cut"))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "TruncatedStreamError"
    assert error.retryable
    texts = [e.text for _, e in handle.records(timeout=5) if isinstance(e, TokenEntry)]
    assert "".join(texts) == "abc"
    assert rq_status(redis_client, handle.job_id) == "failed"
    assert_untouched(redis_client, neighbours)


def test_a_dropped_connection_is_an_error_that_names_what_happened(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """A connection that breaks mid-stream ends the job with a retryable `error` saying how."""
    handle = relay.submit("hi", model=llm.script(["a", "b"], fault="drop"))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "OpenAIConnectionError"
    assert error.retryable
    assert error.message.startswith("Connection error talking to the model server at http://")
    assert "RemoteProtocolError" in error.message  # what actually happened to the connection
    assert_untouched(redis_client, neighbours)


def test_a_model_server_that_is_not_there_is_named_in_the_error(
    relay: Relay, workers: Workers, redis_client: Redis
) -> None:
    """A dead (or never started) model server: the error names its address and the refusal,
    not only the OpenAI client's bare 'Connection error.'."""
    handle = relay.submit("hi")
    port = free_port()  # nothing listens there
    workers.run_burst(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    error = the_error(redis_client, handle)
    assert error.error_type == "OpenAIConnectionError"
    assert error.retryable
    assert error.message.startswith(
        f"Connection error talking to the model server at http://127.0.0.1:{port}: "
        "ConnectionRefusedError"
    )
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_a_job_timeout_ends_that_job_while_the_others_go_on(
    redis_client: Redis,
    settings: Settings,
    llm: ScriptedLLM,
    workers: Workers,
    neighbours: list[JobHandle],
) -> None:
    """A generation that outlives its job timeout gets a timeout `error`; RQ says failed."""
    relay = Relay(redis_client, settings.with_overrides(job_timeout=2))
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.run_burst()
    error = the_error(redis_client, handle)
    assert error.error_type == "JobTimeoutException"
    assert error.message == "the job ran longer than its timeout (2 s)"
    assert error.retryable
    assert rq_status(redis_client, handle.job_id) == "failed"
    assert_untouched(redis_client, neighbours)


def test_a_stop_command_ends_that_job_with_one_error_entry(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """RQ's stop-job command reaches the one job it names among several; RQ says stopped."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.start()
    wait_for_tokens(handle, 3)
    send_stop_job_command(redis_client, handle.job_id, serializer=JSONSerializer)
    error = the_error_eventually(redis_client, handle)
    assert (error.error_type, error.retryable) == ("JobStopped", False)
    wait_for_rq_status(redis_client, handle.job_id, "stopped")
    assert_untouched(redis_client, neighbours)


def test_cancelling_a_running_job_stops_it_with_one_cancelled_entry(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """cancel() ends the stream at once and stops the job's task; nothing is written after."""
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
    assert_untouched(redis_client, neighbours)


def test_a_job_cancelled_through_rq_alone_is_noticed_and_ended(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis, env: dict[str, str]
) -> None:
    """RQ's own `job.cancel()` tells no worker; the heartbeat notices and ends the stream."""
    from rq.job import Job

    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    workers.start(env={"TOKENRELAY_HEARTBEAT_INTERVAL": "1"})
    wait_for_tokens(handle, 3)
    Job.fetch(handle.job_id, connection=redis_client, serializer=JSONSerializer).cancel()
    error = the_error_eventually(redis_client, handle)
    assert error.error_type == "cancelled"
    assert rq_status(redis_client, handle.job_id) == "canceled"  # left as RQ set it


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


def test_a_warm_shutdown_finishes_every_running_job(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    neighbours: list[JobHandle],
) -> None:
    """One SIGTERM stops taking jobs and lets every generation in flight finish; then exit 0."""
    handle = relay.submit("hi", model=llm.script(WORDS, token_delay=0.05))
    worker = workers.start()
    wait_for_tokens(handle, 1)
    worker.signal(signal.SIGTERM)
    wait_for_log(worker, "worker.warm_shutdown")
    later = relay.submit("not taken any more", model=llm.script(["late"]))
    assert worker.wait(timeout=60) == 0
    [entry] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(entry, EndEntry)
    assert handle.text(timeout=5) == "".join(WORDS)
    assert_untouched(redis_client, neighbours)
    assert later.status() is JobState.QUEUED


def test_a_cold_shutdown_ends_every_running_job_with_one_error(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    held_neighbours: list[JobHandle],
) -> None:
    """A second SIGTERM stops every job in flight, each with its `WorkerShutdown` error."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start()
    wait_for_tokens(handle, 3)
    for neighbour in held_neighbours:
        wait_for_tokens(neighbour, 1)
    worker.signal(signal.SIGTERM)
    wait_for_log(worker, "worker.warm_shutdown")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    for job in [handle, *held_neighbours]:
        error = the_error(redis_client, job)
        assert (error.error_type, error.retryable) == ("WorkerShutdown", True)
        assert rq_status(redis_client, job.job_id) == "failed"


def test_every_job_of_a_killed_worker_is_taken_over_and_ended_when_no_attempt_is_left(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    held_neighbours: list[JobHandle],
) -> None:
    """SIGKILL of a worker holding several jobs: a live worker takes over each one (their
    leases lapse), and with one attempt allowed (this module's setting) ends each with
    WorkerLostError. tests/reliability has the takeovers that go on with the text."""
    fast = {"TOKENRELAY_LEASE_TTL": "2", "TOKENRELAY_TAKEOVER_AFTER": "1"}
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start(env=fast)
    wait_for_tokens(handle, 3)
    for neighbour in held_neighbours:
        wait_for_tokens(neighbour, 1)
    worker.signal(signal.SIGKILL)
    worker.wait()
    held = [handle, *held_neighbours]
    assert all(terminal_entries(redis_client, job.job_id) == [] for job in held)
    assert handle.status() is JobState.STARTED
    workers.start(env=fast)
    for job in held:
        error = the_error_eventually(redis_client, job)
        assert error.error_type == "WorkerLostError"
        assert "no attempt is left: 1 of TOKENRELAY_MAX_ATTEMPTS=1 were made" in error.message
        assert error.attempt == 2
        wait_for_rq_status(redis_client, job.job_id, "failed")


def test_a_killed_workers_job_without_a_lease_is_ended_by_rqs_clean_up(
    relay: Relay,
    llm: ScriptedLLM,
    workers: Workers,
    redis_client: Redis,
    settings: Settings,
) -> None:
    """A job whose lease is gone (nothing can take it over) is still ended by RQ's clean-up
    of abandoned jobs once its heartbeat lapses: the fallback of every job."""
    handle = relay.submit("hi", model=llm.script(WORDS, stall_after=3))
    worker = workers.start()
    wait_for_tokens(handle, 3)
    worker.signal(signal.SIGKILL)
    worker.wait()
    redis_client.delete("tokenrelay:leases")
    # The dead worker's heartbeats lapse after a minute and a half; make that time pass.
    wip = "rq:wip:tokenrelay"
    redis_client.zadd(wip, dict.fromkeys(redis_client.zrange(wip, 0, -1), time.time() - 1))
    live = RelayWorker(
        ["tokenrelay"], connection=redis_client, settings=settings, outage=Outage(10)
    )
    assert all(queue.job_class is RelayJob for queue in live.queues)  # the clean-up's job class
    live.clean_up()  # a live worker's periodic maintenance
    error = the_error(redis_client, handle)
    assert error.error_type == "AbandonedJobError"
    assert error.message == "the worker running the job died or vanished (its heartbeat lapsed)"
    assert error.retryable
    assert rq_status(redis_client, handle.job_id) == "failed"


def test_an_api_key_quoted_back_by_the_server_is_redacted_everywhere(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A server that repeats the key in its error: not in the entry, the logs, or RQ's record."""
    from rq.job import Job

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
