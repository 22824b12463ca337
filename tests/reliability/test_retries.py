"""Failed attempts are retried with backoff, and the next attempt continues the text.

Each fault is the real thing, from the scripted model server over real HTTP (a dropped
connection, a stream cut before its finish reason, a 429 with `Retry-After`, a stall), met by a
real worker process. Readers see one text, the scripted one, with no passage twice, and
exactly one terminal entry.
"""

from __future__ import annotations

import pytest
from redis import Redis
from support.scripted_openai import Attempt, ScriptedOpenAI
from support.scripts import ScriptedLLM
from support.streams import terminal_entries
from support.workers import Workers

from tokenrelay import EndEntry, ErrorEntry, JobHandle, Relay, TokenEntry
from tokenrelay.stream.protocol import AttemptEntry, Entry, Policy, State, StatusEntry
from tokenrelay.worker.continuation import CONTINUE

WORDS = [f" word{i}" for i in range(24)]
TEXT = "".join(WORDS)

#: Retries that wait little, so that the tests do not.
FAST_RETRIES = {"TOKENRELAY_MAX_ATTEMPTS": "4", "TOKENRELAY_RETRY_DELAY": "0.05"}


def entries(handle: JobHandle) -> list[Entry]:
    """Every entry of the job's stream, to its end."""
    return [record.entry for record in handle.records(timeout=60)]


def the_end(client: Redis, handle: JobHandle) -> EndEntry:
    """The job's one terminal entry, which must be an `end`."""
    [end] = terminal_entries(client, handle.job_id)
    assert isinstance(end, EndEntry)
    return end


def attempts_of(stream: list[Entry]) -> list[AttemptEntry]:
    return [e for e in stream if isinstance(e, AttemptEntry)]


def requests_for(server: ScriptedOpenAI, model: str) -> list[dict[str, object]]:
    return [body for body in server.requests if body.get("model") == model]


def test_a_connection_dropped_mid_answer_is_retried_and_the_text_continued(
    relay: Relay,
    llm: ScriptedLLM,
    llm_server: ScriptedOpenAI,
    workers: Workers,
    redis_client: Redis,
) -> None:
    """The next attempt asks the model to go on from the text so far; readers see one text."""
    model = llm.script(WORDS, attempts=[Attempt(fault="drop", after=7)])
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env=FAST_RETRIES)

    stream = entries(handle)
    assert handle.text(timeout=5) == TEXT
    [attempt] = attempts_of(stream)
    assert (attempt.attempt, attempt.reason, attempt.policy) == (
        2,
        "OpenAIConnectionError",
        "continue",
    )
    assert attempt.from_seq == 7
    retrying = [e for e in stream if isinstance(e, StatusEntry)]
    assert [s.state for s in retrying] == [State.RETRYING]
    assert stream.index(retrying[0]) < stream.index(attempt)
    end = the_end(redis_client, handle)
    assert end.attempts == 2
    assert end.tokens == len(WORDS)
    assert end.completion_tokens == len(WORDS)  # 7 streamed before the drop, 17 after

    first, second = requests_for(llm_server, model)
    messages = second["messages"]
    assert isinstance(messages, list)
    assert messages[-2] == {"role": "assistant", "content": "".join(WORDS[:7])}
    assert messages[-1] == {"role": "user", "content": CONTINUE}
    assert first["messages"] == messages[:-2]


def test_a_stream_cut_before_its_finish_reason_is_retried_and_continued(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A truncated answer is not a success: the next attempt finishes it."""
    model = llm.script(WORDS, attempts=[Attempt(fault="cut", after=11)])
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env=FAST_RETRIES)

    [attempt] = attempts_of(entries(handle))
    assert (attempt.reason, attempt.from_seq) == ("TruncatedStreamError", 11)
    assert handle.text(timeout=5) == TEXT
    assert the_end(redis_client, handle).attempts == 2


def test_a_429_storm_is_waited_out_as_retry_after_says(
    relay: Relay, llm: ScriptedLLM, llm_server: ScriptedOpenAI, workers: Workers
) -> None:
    """Three 429s in a row, each asking for a wait: the retries wait at least that long."""
    storm = [Attempt(status=429, retry_after=0.4)] * 3
    model = llm.script(WORDS, attempts=storm)
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env={**FAST_RETRIES, "TOKENRELAY_MAX_ATTEMPTS": "5"})

    stream = entries(handle)
    assert handle.text(timeout=5) == TEXT
    waits = [e.retry_in_ms for e in stream if isinstance(e, StatusEntry)]
    assert len(waits) == 3
    assert all(w is not None and w >= 400 for w in waits)
    assert [a.reason for a in attempts_of(stream)] == ["OpenAIRateLimitError"] * 3
    assert len(requests_for(llm_server, model)) == 4


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "OpenAIInvalidRequestError"),
        (401, "OpenAIAuthenticationError"),
        (403, "OpenAIPermissionDeniedError"),
        (404, "OpenAIModelNotFoundError"),
    ],
)
def test_a_request_the_server_refuses_fails_at_once_without_a_retry(
    relay: Relay,
    llm: ScriptedLLM,
    llm_server: ScriptedOpenAI,
    workers: Workers,
    redis_client: Redis,
    status: int,
    error_type: str,
) -> None:
    """400, 401, 403 and 404 do not go away by trying again: one request, one error entry."""
    model = llm.script(WORDS, attempts=[Attempt(status=status)])
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env=FAST_RETRIES)

    [error] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(error, ErrorEntry)
    assert (error.error_type, error.retryable, error.attempt) == (error_type, False, 1)
    assert len(requests_for(llm_server, model)) == 1
    assert attempts_of(entries(handle)) == []


def test_when_the_attempts_run_out_the_job_ends_with_the_last_error(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Every attempt dropped: one error entry, retryable, naming the last attempt."""
    drops = [Attempt(fault="drop", after=2)] * 3  # each attempt gets two more tokens
    model = llm.script(WORDS, attempts=drops)
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env={**FAST_RETRIES, "TOKENRELAY_MAX_ATTEMPTS": "3"})

    [error] = terminal_entries(redis_client, handle.job_id)
    assert isinstance(error, ErrorEntry)
    assert (error.error_type, error.retryable, error.attempt) == ("OpenAIConnectionError", True, 3)
    stream = entries(handle)
    assert [a.from_seq for a in attempts_of(stream)] == [2, 4]
    text = "".join(e.text for e in stream if isinstance(e, TokenEntry))
    assert text == "".join(WORDS[:6])  # what the three attempts got, once each


def test_a_stall_before_the_first_token_times_out_and_is_retried(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """No first token within the first-token timeout: the attempt ends, the next one answers."""
    model = llm.script(WORDS, attempts=[Attempt(stall=True, after=0)])
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env={**FAST_RETRIES, "TOKENRELAY_FIRST_TOKEN_TIMEOUT": "0.5"})

    [attempt] = attempts_of(entries(handle))
    assert (attempt.reason, attempt.from_seq) == ("FirstTokenTimeoutError", 0)
    assert handle.text(timeout=5) == TEXT
    assert the_end(redis_client, handle).attempts == 2


def test_a_stall_mid_answer_times_out_and_the_text_is_continued(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """No token within the stall timeout of the one before: the next attempt goes on."""
    model = llm.script(WORDS, attempts=[Attempt(stall=True, after=9)])
    handle = relay.submit("tell me", model=model)
    timeouts = {"TOKENRELAY_STALL_TIMEOUT": "0.5", "TOKENRELAY_FIRST_TOKEN_TIMEOUT": "60"}
    workers.run_burst(env={**FAST_RETRIES, **timeouts})

    records = list(handle.records(timeout=5))
    [attempt] = attempts_of([r.entry for r in records])
    assert (attempt.reason, attempt.from_seq) == ("StallTimeoutError", 9)
    assert handle.text(timeout=5) == TEXT
    last_token = max(r for r in records if isinstance(r.entry, TokenEntry) and r.entry.seq < 9)
    retrying = next(r for r in records if isinstance(r.entry, StatusEntry))
    noticed_ms = int(retrying.id.split("-")[0]) - int(last_token.id.split("-")[0])
    assert 400 <= noticed_ms < 2_000  # the stall timeout (0.5 s), not the first-token one


@pytest.mark.parametrize("where", ["job", "worker"])
def test_an_attempt_that_takes_too_long_in_all_is_ended_and_continued(
    where: str, relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Tokens still coming, but the attempt past its attempt timeout (the job's own, or the
    worker's): it ends as AttemptTimeoutError and the next attempt goes on from its text."""
    model = llm.script(WORDS, token_delay=0.02, attempts=[Attempt(stall=True, after=5)])
    slow = {"TOKENRELAY_FIRST_TOKEN_TIMEOUT": "600", "TOKENRELAY_STALL_TIMEOUT": "600"}
    if where == "job":
        handle = relay.submit("tell me", model=model, attempt_timeout=1)
    else:
        handle = relay.submit("tell me", model=model)
        slow["TOKENRELAY_ATTEMPT_TIMEOUT"] = "1"
    workers.run_burst(env={**FAST_RETRIES, **slow})

    records = list(handle.records(timeout=5))
    [attempt] = attempts_of([r.entry for r in records])
    assert (attempt.reason, attempt.from_seq) == ("AttemptTimeoutError", 5)
    assert handle.text(timeout=5) == TEXT
    start_ms = int(records[0].id.split("-")[0])
    retrying = next(r for r in records if isinstance(r.entry, StatusEntry))
    assert 900 <= int(retrying.id.split("-")[0]) - start_ms < 3_000  # 1 s, not 600
    assert the_end(redis_client, handle).attempts == 2


def test_a_jobs_own_timeouts_override_the_workers(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """A job's first-token and stall timeouts win over the worker's (here much longer) ones."""
    model = llm.script(WORDS, attempts=[Attempt(stall=True, after=0), Attempt(stall=True, after=3)])
    handle = relay.submit("tell me", model=model, first_token_timeout=0.5, stall_timeout=0.5)
    slow = {"TOKENRELAY_FIRST_TOKEN_TIMEOUT": "600", "TOKENRELAY_STALL_TIMEOUT": "600"}
    workers.run_burst(env={**FAST_RETRIES, **slow})

    reasons = [a.reason for a in attempts_of(entries(handle))]
    assert reasons == ["FirstTokenTimeoutError", "StallTimeoutError"]
    assert handle.text(timeout=5) == TEXT


def test_the_restart_policy_starts_over_and_readers_drop_the_failed_text(
    relay: Relay,
    llm: ScriptedLLM,
    llm_server: ScriptedOpenAI,
    workers: Workers,
    redis_client: Redis,
) -> None:
    """With `restart`, the new attempt asks again from scratch; the final text is its alone."""
    model = llm.script(WORDS, attempts=[Attempt(fault="drop", after=5)])
    handle = relay.submit("tell me", model=model)
    workers.run_burst(env={**FAST_RETRIES, "TOKENRELAY_RETRY_POLICY": "restart"})

    stream = entries(handle)
    [attempt] = attempts_of(stream)
    assert (attempt.policy, attempt.from_seq) == (Policy.RESTART, 0)
    assert handle.text(timeout=5) == TEXT
    streamed = "".join(e.text for e in stream if isinstance(e, TokenEntry))
    assert streamed == "".join(WORDS[:5]) + TEXT  # what `tokens()` yields, attempt by attempt
    end = the_end(redis_client, handle)
    assert (end.tokens, end.attempts) == (len(WORDS), 2)
    first, second = requests_for(llm_server, model)
    assert first["messages"] == second["messages"]


def test_the_whole_jobs_timeout_covers_every_attempt(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Retries do not stretch a job past its own timeout: it ends with one timeout error."""
    stalls = [Attempt(stall=True, after=1)] * 10
    model = llm.script(WORDS, attempts=stalls)
    handle = relay.submit("tell me", model=model, timeout=3)
    worker = workers.start(
        env={**FAST_RETRIES, "TOKENRELAY_MAX_ATTEMPTS": "10", "TOKENRELAY_STALL_TIMEOUT": "0.5"}
    )

    *_, last = handle.records(timeout=30)
    assert isinstance(last.entry, ErrorEntry)
    assert last.entry.error_type == "JobTimeoutException"
    assert len(terminal_entries(redis_client, handle.job_id)) == 1
    assert worker.process.poll() is None
