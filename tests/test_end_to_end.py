"""End to end: a prompt submitted, a worker process streaming it, readers following it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from redis import Redis
from support.scripted_openai import ScriptedOpenAI
from support.scripts import SECRET_KEY, ScriptedLLM
from support.streams import tokens_in, wait_for_tokens
from support.workers import Workers

from tokenrelay import (
    EndEntry,
    Event,
    JobState,
    Record,
    Relay,
    StartEntry,
    TokenEntry,
)
from tokenrelay.stream.protocol import parse_event

WORDS = [f" word{i}" for i in range(40)]


def texts(records: Iterator[Record]) -> str:
    """The text carried by the token entries of `records`."""
    return "".join(r.entry.text for r in records if isinstance(r.entry, TokenEntry))


def test_a_submitted_prompt_streams_its_scripted_text(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """A burst worker runs the job and the stream holds start, the tokens in order, and end."""
    model = llm.script(["Hello", ",", " world", "!"])
    handle = relay.submit("Say hello", model=model, max_tokens=50)
    workers.run_burst()
    entries = [entry for _, entry in handle.records(timeout=10)]
    start, *tokens, end = entries
    assert isinstance(start, StartEntry)
    assert (start.job_id, start.model, start.attempt, start.max_tokens, start.prompt_chars) == (
        handle.job_id,
        model,
        1,
        50,
        len("Say hello"),
    )
    assert start.submitted_at is not None
    assert start.submitted_at <= start.started_at
    assert all(isinstance(t, TokenEntry) for t in tokens)
    assert "".join(t.text for t in tokens if isinstance(t, TokenEntry)) == "Hello, world!"
    assert tokens_in(tokens) == 4  # in as many entries as the writes needed (integrity: seq)
    assert isinstance(end, EndEntry)
    assert (end.finish_reason, end.tokens, end.completion_tokens) == ("stop", 4, 4)
    assert end.prompt_tokens == 2
    assert end.total_tokens == 6
    assert end.ttft_ms is not None
    assert end.duration_ms is not None
    assert end.queue_wait_ms is not None
    assert 0 < end.ttft_ms <= end.duration_ms
    assert handle.text(timeout=10) == "Hello, world!"
    assert handle.status() is JobState.FINISHED


def test_two_viewers_following_one_generation_both_see_exactly_the_text(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Two readers that follow a job while it streams each see every token once, in order."""
    model = llm.script(WORDS, token_delay=0.01)
    handle = relay.submit("count", model=model)
    seen: dict[str, list[Record]] = {}

    def follow(name: str) -> None:
        seen[name] = list(handle.records(timeout=30))

    viewers = [threading.Thread(target=follow, args=(name,)) for name in ("a", "b")]
    for viewer in viewers:
        viewer.start()
    workers.start()
    for viewer in viewers:
        viewer.join(timeout=60)
    assert texts(iter(seen["a"])) == texts(iter(seen["b"])) == "".join(WORDS)
    assert seen["a"] == seen["b"]
    assert [type(r.entry) for r in seen["a"]].count(EndEntry) == 1


def test_a_viewer_that_joins_after_the_end_sees_the_full_text(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """The stream is a durable log: replaying it after the end gives the whole generation."""
    handle = relay.submit("count", model=llm.script(WORDS))
    workers.run_burst()
    late = list(handle.records(timeout=5))
    assert texts(iter(late)) == "".join(WORDS)
    assert isinstance(late[-1].entry, EndEntry)


def test_a_reader_resumes_after_the_last_entry_it_saw(
    relay: Relay, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """A reader that disconnects mid-stream and resumes from its last entry id misses nothing."""
    handle = relay.submit("count", model=llm.script(WORDS, stall_after=10))
    workers.start()
    first: list[Record] = []
    for record in handle.records(timeout=30):
        first.append(record)
        if tokens_in(r.entry for r in first) >= 10:
            break  # the reader goes away here
    llm_server.release()
    rest = list(handle.records(after=first[-1].id, timeout=30))
    assert texts(iter(first)) + texts(iter(rest)) == "".join(WORDS)
    assert {r.id for r in first}.isdisjoint(r.id for r in rest)


def test_a_finished_stream_can_be_read_from_any_entry_id(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Resuming after any token entry's id yields exactly the tokens after it."""
    handle = relay.submit("count", model=llm.script(WORDS, token_delay=0.002))
    workers.run_burst()
    records = list(handle.records(timeout=5))
    for record in records:
        if isinstance(record.entry, TokenEntry):
            after = record.entry.seq + record.entry.count
            assert texts(handle.records(after=record.id, timeout=5)) == "".join(WORDS[after:])


def test_a_live_reader_sees_only_what_is_generated_after_it_joins(
    relay: Relay, llm: ScriptedLLM, workers: Workers, llm_server: ScriptedOpenAI
) -> None:
    """`live` skips the tokens generated before the reader arrived."""
    handle = relay.submit("count", model=llm.script(WORDS, stall_after=10))
    workers.start()
    wait_for_tokens(handle, 10)
    live = handle.records(live=True, timeout=30)
    llm_server.release()
    assert texts(live) == "".join(WORDS[10:])


def test_a_live_reader_of_an_ended_job_gets_its_terminal_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Joining live after the end does not hang: the reader gets the end entry and stops."""
    handle = relay.submit("count", model=llm.script(["a", "b"]))
    workers.run_burst()
    [record] = list(handle.records(live=True, timeout=5))
    assert isinstance(record.entry, EndEntry)


UNICODE_TOKENS = [
    "héllo",
    " wörld",
    " 你好",
    " 👋🏽",
    " e\u0301",  # a combining acute accent
    "🇫🇷",
    "\n",
    "",
    "\t tab",
    "line\r\n",
    "\u200d",
    "\x00nul",
    "x" * 20_000,
    " end",
]


def test_tokens_of_any_text_survive_byte_for_byte(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Multi-byte UTF-8, emoji, combining marks, newlines, empty and long deltas arrive intact."""
    handle = relay.submit("unicode", model=llm.script(UNICODE_TOKENS))
    workers.run_burst()
    assert handle.text(timeout=10).encode() == "".join(UNICODE_TOKENS).encode()
    entries = [r.entry for r in handle.records(timeout=5)]
    assert tokens_in(entries) == len(UNICODE_TOKENS) - 1  # the empty delta carries nothing


def test_a_token_that_cannot_be_encoded_is_repaired_and_reported(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """Surrogate halves split across deltas are rejoined; a lone one becomes U+FFFD, logged."""
    tokens = ["a", "\ud83d", "\ude00", "b", "\ud800", "c"]
    handle = relay.submit("surrogates", model=llm.script(tokens))
    worker = workers.run_burst()
    assert handle.text(timeout=10) == "a\U0001f600b\ufffdc"
    warnings = [line for line in worker.logs() if line["event"] == "token.unencodable"]
    assert [w["replaced"] for w in warnings] == [1]
    assert warnings[0]["job_id"] == handle.job_id


def test_the_lifecycle_stream_records_each_state_change_once(
    relay: Relay, llm: ScriptedLLM, workers: Workers, redis_client: Redis
) -> None:
    """Consumers discover jobs from the lifecycle stream: submitted, started, finished or failed."""
    ok = relay.submit("a", model=llm.script(["x"]))
    bad = relay.submit("b", model=llm.script(status=500))
    workers.run_burst()
    events = [parse_event(fields) for _, fields in redis_client.xrange("tokenrelay:events")]
    by_job = {job: [e.event for e in events if e.job_id == job] for job in (ok.job_id, bad.job_id)}
    assert by_job[ok.job_id] == [Event.SUBMITTED, Event.STARTED, Event.FINISHED]
    assert by_job[bad.job_id] == [Event.SUBMITTED, Event.STARTED, Event.FAILED]
    failed = next(e for e in events if e.event is Event.FAILED)
    assert failed.error_type == "OpenAIAPIError"


def test_worker_logs_are_structured_and_keep_prompts_and_keys_out(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """One line per lifecycle step, each with job_id and attempt; no prompt, text or API key."""
    handle = relay.submit("a confidential prompt", model=llm.script(["private", " answer"]))
    failing = relay.submit("another confidential prompt", model=llm.script(status=500))
    worker = workers.run_burst()
    lines = worker.logs()
    raw = worker.log_path.read_text()
    assert "confidential" not in raw
    assert "private" not in raw
    assert SECRET_KEY not in raw
    mine = [line for line in lines if line.get("job_id") == handle.job_id]
    steps = [line["event"] for line in mine if line["event"].startswith("job.")]
    assert steps == ["job.started", "job.first_token", "job.finished"]
    assert all(line["attempt"] == 1 for line in mine)
    finished = next(line for line in mine if line["event"] == "job.finished")
    assert finished["tokens"] == 2
    assert finished["tokens_per_s"] > 0
    assert finished["duration_ms"] > 0
    first = next(line for line in mine if line["event"] == "job.first_token")
    assert first["ttft_ms"] > 0
    failed = [line for line in lines if line["event"] == "job.failed"]
    assert [(f["job_id"], f["error_type"]) for f in failed] == [(failing.job_id, "OpenAIAPIError")]
    # RQ's dequeue notice is logged before any hook knows the job; it names the id in its text.
    dequeued = f"{handle.job_id}" in next(
        line["event"] for line in lines if "tokenrelay: " in line["event"]
    )
    about_job = [
        line
        for line in lines
        if handle.job_id in line["event"] and "tokenrelay: " not in line["event"]
    ]
    assert dequeued
    assert about_job
    assert all(line.get("job_id") == handle.job_id for line in about_job)


def test_a_failed_job_raises_with_its_error_entry(
    relay: Relay, llm: ScriptedLLM, workers: Workers
) -> None:
    """text() raises JobFailedError carrying the error entry when the model fails."""
    from tokenrelay import JobFailedError

    handle = relay.submit("x", model=llm.script(status=500))
    workers.run_burst()
    with pytest.raises(JobFailedError) as failure:
        handle.text(timeout=10)
    assert failure.value.error.retryable
    assert handle.status() is JobState.FAILED
