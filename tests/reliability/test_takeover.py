"""A dead worker's jobs are taken over within seconds and go on from the text they had.

Workers are real processes, killed with SIGKILL or paused with SIGSTOP mid-stream. Each job
holds a lease its worker renews; a live worker claims the jobs whose lease lapsed, fences the
old writer out in the same atomic step, and continues each text where its stream stops.
"""

from __future__ import annotations

import signal
import time

from redis import Redis
from support.scripts import ScriptedLLM
from support.streams import rq_status, terminal_entries, tokens_in, wait_for_tokens
from support.waiting import wait_until
from support.workers import WorkerProcess, Workers

from tokenrelay import EndEntry, ErrorEntry, JobHandle, JobState, Relay, StartEntry, TokenEntry
from tokenrelay.stream.keys import LEASES
from tokenrelay.stream.protocol import AttemptEntry, Entry, State, StatusEntry

WORDS = [f" word{i}" for i in range(40)]
TEXT = "".join(WORDS)

#: Leases that lapse in seconds, and takeovers soon after, so the tests run quickly.
FAST_LEASES = {
    "TOKENRELAY_LEASE_TTL": "1.5",
    "TOKENRELAY_TAKEOVER_AFTER": "0.5",
}


def entries(handle: JobHandle) -> list[Entry]:
    return [record.entry for record in handle.records(timeout=60)]


def assert_whole(client: Redis, handle: JobHandle, text: str = TEXT) -> list[Entry]:
    """The job's text is the scripted one, once; its stream ends with one `end`."""
    assert handle.text(timeout=60) == text
    assert [type(e) for e in terminal_entries(client, handle.job_id)] == [EndEntry]
    return entries(handle)


def kill(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGKILL)
    worker.wait()


def test_a_killed_workers_job_is_taken_over_and_its_text_continued(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Readers see `stalled`, then a new attempt that goes on where the stream stopped."""
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    first = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 8)
    kill(first)
    workers.start(env=FAST_LEASES)

    stream = assert_whole(redis_client, handle)
    [stalled] = [e for e in stream if isinstance(e, StatusEntry)]
    [attempt] = [e for e in stream if isinstance(e, AttemptEntry)]
    assert stalled.state == State.STALLED
    assert stream.index(stalled) < stream.index(attempt)
    assert (attempt.attempt, attempt.reason) == (2, "WorkerLost")
    assert attempt.from_seq >= 8
    assert tokens_in(stream[: stream.index(attempt)]) == attempt.from_seq
    wait_until(lambda: rq_status(redis_client, handle.job_id) == "finished", what="RQ: finished")
    assert redis_client.zscore(LEASES, handle.job_id) is None


def test_a_job_whose_workers_keep_dying_still_ends_with_its_whole_text(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Three workers killed in turn mid-stream: each next one continues from the last."""
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    seen = 0
    for _ in range(3):
        worker = workers.start(env=FAST_LEASES)
        seen += 6
        wait_for_tokens(handle, seen)
        kill(worker)
    workers.start(env=FAST_LEASES)

    stream = assert_whole(redis_client, handle)
    attempts = [e for e in stream if isinstance(e, AttemptEntry)]
    assert [a.attempt for a in attempts] == [2, 3, 4]
    end = stream[-1]
    assert isinstance(end, EndEntry)
    assert end.attempts == 4


def test_a_busy_worker_takes_over_every_job_of_a_dead_one_while_its_own_go_on(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A worker holding three jobs dies; another, streaming three of its own, takes all three."""
    survivor = workers.start("--concurrency", "3", env=FAST_LEASES)
    own = [relay.submit(f"own {i}", model=llm.script(WORDS, token_delay=0.1)) for i in range(3)]
    for handle in own:
        wait_for_tokens(handle, 1)
    doomed = workers.start(env=FAST_LEASES)
    orphans = [
        relay.submit(f"orphan {i}", model=llm.script(WORDS, token_delay=0.05)) for i in range(3)
    ]
    for handle in orphans:
        wait_for_tokens(handle, 5)
    kill(doomed)

    for handle in [*orphans, *own]:
        assert_whole(redis_client, handle)
    taken = [line for line in survivor.logs() if line["event"] == "job.taken_over"]
    assert sorted(line["job_id"] for line in taken) == sorted(h.job_id for h in orphans)


def lease_lapsed(client: Redis, job_id: str, by: float) -> bool:
    """Whether the job's lease ran out more than `by` seconds ago, by Redis's clock."""
    deadline = client.zscore(LEASES, job_id)
    seconds, micros = client.time()
    return deadline is not None and seconds + micros / 1e6 > deadline / 1000 + by


def test_the_next_worker_to_start_takes_over_at_once_when_none_was_left(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """With the only worker dead for a while, a new one continues the job within seconds."""
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    worker = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 8)
    kill(worker)
    wait_until(lambda: lease_lapsed(redis_client, handle.job_id, by=3), what="a long-lapsed lease")
    assert handle.status() is JobState.STARTED

    started = time.monotonic()
    workers.start(env=FAST_LEASES)
    next(r for r in handle.records(timeout=30) if isinstance(r.entry, AttemptEntry))
    took = time.monotonic() - started
    assert took < 10, f"the new worker took {took:.1f} s to take over"
    assert_whole(redis_client, handle)


def test_a_paused_worker_that_comes_back_after_a_takeover_writes_nothing(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """SIGSTOP mid-stream, taken over, SIGCONT: the old worker is fenced out, text stays whole."""
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    paused = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 8)
    paused.signal(signal.SIGSTOP)
    try:
        workers.start(env=FAST_LEASES)
        assert_whole(redis_client, handle)
    finally:
        paused.signal(signal.SIGCONT)
    wait_until(
        lambda: any(
            line["event"] in ("job.lease_refused", "stream.refused") for line in paused.logs()
        ),
        what="the paused worker learns it was fenced out",
    )
    stream = assert_whole(redis_client, handle)
    texts = [e.text for e in stream if isinstance(e, TokenEntry)]
    assert "".join(texts) == TEXT
    assert paused.process.poll() is None  # fenced out of one job, alive for others
    later = relay.submit("again", model=llm.script(["still", " here"]))
    assert later.text(timeout=30) == "still here"


def test_with_default_settings_a_dead_workers_job_goes_on_within_30_seconds(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """The documented bound, with the shipped lease and takeover settings."""
    words = WORDS[:30]
    handle = relay.submit("tell me", model=llm.script(words, token_delay=0.2))
    doomed = workers.start()
    wait_for_tokens(handle, 2)
    survivor = workers.start()  # idle, as most live workers are
    wait_until(lambda: any(line["event"] == "worker.starting" for line in survivor.logs()))
    killed = time.monotonic()
    kill(doomed)
    [(last_id, _)] = redis_client.xrevrange(handle.stream_key, count=1)
    after_kill = handle.records(after=last_id.decode(), timeout=60)
    next(r for r in after_kill if isinstance(r.entry, TokenEntry))
    recovered = time.monotonic() - killed
    assert recovered < 30, f"{recovered:.1f} s from the kill to the next token"
    assert_whole(redis_client, handle, "".join(words))


def test_a_paused_worker_whose_job_timed_out_meanwhile_leaves_the_takers_run_alone(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Its overdue timeout fires when it resumes: it ends nothing, RQ's record is the taker's."""
    words = WORDS[:30]
    handle = relay.submit("tell me", model=llm.script(words, token_delay=0.05), timeout=5)
    paused = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 5)
    paused.signal(signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        workers.start(env=FAST_LEASES)
        assert_whole(redis_client, handle, "".join(words))
        wait_until(lambda: time.monotonic() - paused_at > 5.5, what="the paused run's timeout")
    finally:
        paused.signal(signal.SIGCONT)
    wait_until(
        lambda: any(line["event"] == "job.taken_over_elsewhere" for line in paused.logs()),
        what="the resumed worker finds the job is another's",
    )
    assert [type(e) for e in terminal_entries(redis_client, handle.job_id)] == [EndEntry]
    assert rq_status(redis_client, handle.job_id) == "finished"


def test_a_job_cancelled_through_rq_while_its_worker_was_dead_is_ended_not_run(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """`job.cancel()` with no live worker: the next one ends the stream as cancelled."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    doomed = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 5)
    kill(doomed)
    Job.fetch(handle.job_id, connection=redis_client, serializer=JSONSerializer).cancel()
    workers.start(env=FAST_LEASES)
    *_, last = handle.records(timeout=30)
    assert isinstance(last.entry, ErrorEntry)
    assert last.entry.error_type == "cancelled"
    assert not any(isinstance(r.entry, AttemptEntry) for r in handle.records(timeout=5))


def test_a_job_rqs_clean_up_failed_while_its_lease_said_otherwise_is_taken_over(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """RQ's own clean-up (what `rq info` runs) found the dead worker's job abandoned before
    any worker took it over: the takeover still continues it, and RQ ends up agreeing."""
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.05))
    doomed = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 5)
    kill(doomed)
    started = StartedJobRegistry("tokenrelay", connection=redis_client)
    for member in redis_client.zrange(started.key, 0, -1):  # its heartbeat lapsed long ago
        redis_client.zadd(started.key, {member: 1})
    started.cleanup()
    assert rq_status(redis_client, handle.job_id) == "failed"

    workers.start(env=FAST_LEASES)
    assert_whole(redis_client, handle)
    wait_until(lambda: rq_status(redis_client, handle.job_id) == "finished", what="RQ agrees")
    failed = FailedJobRegistry("tokenrelay", connection=redis_client)
    assert handle.job_id not in failed.get_job_ids()


def test_a_job_taken_over_keeps_its_own_timeout_not_a_fresh_one(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """The job's timeout counts from its first attempt: the taker ends it on time."""
    handle = relay.submit("tell me", model=llm.script(WORDS, token_delay=0.2), timeout=4)
    doomed = workers.start(env=FAST_LEASES)
    wait_for_tokens(handle, 2)
    kill(doomed)
    workers.start(env=FAST_LEASES)
    *_, last = handle.records(timeout=30)
    assert isinstance(last.entry, ErrorEntry)
    assert last.entry.error_type == "JobTimeoutException"
    [start] = [r for r in handle.records(timeout=5) if isinstance(r.entry, StartEntry)]
    ran_ms = int(last.id.split("-")[0]) - int(start.id.split("-")[0])
    assert 4_000 <= ran_ms < 6_000
