"""Properties of the stream protocol, over arbitrary values: what is written is what is read.

Every entry kind parses back to itself from its strings (floats to three decimals, as they
are written), also through a real Redis; and a generation split into entries at arbitrary
points, over attempts that continue or restart, reads back as its text and passes the
readers' one integrity check, while a lost or repeated token entry does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from tokenrelay.errors import ProtocolError
from tokenrelay.stream.integrity import StreamCheck
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    Entry,
    ErrorEntry,
    Event,
    LifecycleEvent,
    Policy,
    Record,
    StartEntry,
    State,
    StatusEntry,
    TokenEntry,
    encode,
    encode_event,
    parse,
    parse_event,
)
from tokenrelay.stream.text import Transcript

#: Fast and in memory: many examples; no example database left in the working tree.
PROPERTIES = settings(max_examples=200, deadline=None, database=None)
#: Through Redis: fewer examples, on the test's flushed database (one for all of them).
THROUGH_REDIS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

#: Any text Redis can hold as UTF-8: unicode, control characters, NUL, the empty string.
texts = st.text()
#: What a model sends in one delta: never empty (empty deltas are not written).
deltas = st.text(min_size=1, max_size=8)
counts = st.integers(min_value=0, max_value=2**63 - 1)
numbers = st.floats(allow_nan=False)  # NaN is the one float that is not equal to itself

starts = st.builds(
    StartEntry,
    job_id=texts,
    model=texts,
    attempt=counts,
    submitted_at=numbers,  # absent: see test_a_start_entry_without_its_submission_time_parses_back
    started_at=numbers,
    worker=texts,
    max_tokens=counts,
    prompt_chars=counts,
    writer=texts,
    v=counts,
)
tokens = st.builds(TokenEntry, seq=counts, text=texts, n=st.none() | counts)
attempts = st.builds(
    AttemptEntry, attempt=counts, reason=texts, policy=st.sampled_from(Policy), from_seq=counts
)
statuses = st.builds(
    StatusEntry, state=st.sampled_from(State), detail=texts, retry_in_ms=st.none() | numbers
)
ends = st.builds(
    EndEntry,
    finish_reason=texts,
    tokens=counts,
    prompt_tokens=st.none() | counts,
    completion_tokens=st.none() | counts,
    total_tokens=st.none() | counts,
    queue_wait_ms=st.none() | numbers,
    ttft_ms=st.none() | numbers,
    duration_ms=st.none() | numbers,
    attempts=counts,
)
errors = st.builds(
    ErrorEntry, error_type=texts, message=texts, retryable=st.booleans(), attempt=counts
)
entries: st.SearchStrategy[Entry] = st.one_of(starts, tokens, attempts, statuses, ends, errors)
events = st.builds(
    LifecycleEvent,
    event=st.sampled_from(Event),
    job_id=texts,
    at=numbers,
    queue=st.none() | texts,
    model=st.none() | texts,
    error_type=st.none() | texts,
)


def as_written(value: Any) -> Any:
    """The value as a reader gets it back: its floats rounded to three decimals."""
    rounded = {
        f.name: round(v, 3) for f in fields(value) if isinstance(v := getattr(value, f.name), float)
    }
    return replace(value, **rounded)


def from_redis(fields_: dict[str, str]) -> dict[bytes, bytes]:
    """The fields as a client made for RQ (`decode_responses=False`) returns them."""
    return {k.encode(): v.encode() for k, v in fields_.items()}


@PROPERTIES
@given(entries)
def test_every_entry_parses_back_from_its_strings(entry: Entry) -> None:
    """Any entry, encoded to strings and read back as Redis's bytes, is the same entry, its
    floats rounded to three decimals; its kind comes first."""
    written = encode(entry)
    assert next(iter(written)) == "kind"
    assert all(isinstance(v, str) for v in written.values())
    assert parse(from_redis(written)) == as_written(entry)
    assert parse(written) == as_written(entry)


@PROPERTIES
@given(entries)
def test_an_entry_written_twice_reads_the_same(entry: Entry) -> None:
    """Encoding is stable: an entry read back and written again gives the same strings."""
    written = encode(entry)
    assert encode(parse(written)) == written


@PROPERTIES
@given(events)
def test_every_lifecycle_event_parses_back_from_its_strings(event: LifecycleEvent) -> None:
    """Any lifecycle event round-trips like an entry, its `event` first and absent fields left
    out (an empty string is kept: it is not absent)."""
    written = encode_event(event)
    assert next(iter(written)) == "event"
    for name in ("queue", "model", "error_type"):
        assert (name in written) == (getattr(event, name) is not None)
    assert parse_event(from_redis(written)) == as_written(event)


def through_redis(client: Redis, key: str, written: dict[str, str]) -> dict[bytes, bytes]:
    """The fields appended to a real stream with XADD, as XRANGE reads them back."""
    entry_id = client.xadd(key, dict[Any, Any](written))
    read = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key, entry_id, entry_id))
    return read[0][1]


@THROUGH_REDIS
@given(entry=entries)
def test_every_entry_survives_xadd_and_xrange(redis_client: Redis, entry: Entry) -> None:
    """An entry appended to a real stream and read back with XRANGE is the same entry (floats
    to three decimals), with its fields in the order they were written."""
    read = through_redis(redis_client, "tokenrelay:{property}:tokens", encode(entry))
    assert [k.decode() for k in read] == list(encode(entry))
    assert parse(read) == as_written(entry)


@THROUGH_REDIS
@given(event=events)
def test_every_lifecycle_event_survives_xadd_and_xrange(
    redis_client: Redis, event: LifecycleEvent
) -> None:
    """A lifecycle event appended to a real stream and read back is the same event."""
    read = through_redis(redis_client, "tokenrelay:events", encode_event(event))
    assert parse_event(read) == as_written(event)


@dataclass
class Generation:
    """A stream as a worker writes it, and what readers must make of it."""

    entries: list[Entry] = field(default_factory=list)
    text: str = ""  # the text since the last restart: what readers must show
    tokens: int = 0  # its token count: what the `end` entry says
    counted: list[int] = field(default_factory=list)  # its token entries, by position

    def records(self) -> list[Record]:
        """The entries as a reader gets them: written, read back, with increasing ids."""
        return [Record(f"{i + 1}-0", parse(encode(e))) for i, e in enumerate(self.entries)]


@st.composite
def generations(draw: st.DrawFn) -> Generation:
    """One job's stream: attempts of arbitrary tokens, each cut into entries of `n` tokens at
    arbitrary points; between attempts maybe a `retrying` status, then an `attempt` entry that
    continues the text or restarts it; a `start` first and an `end` last."""
    runs = draw(st.lists(st.lists(deltas, max_size=12), min_size=1, max_size=5))
    gen = Generation([StartEntry("job", "m", 1, None, 1.0, "w", 100, 3)])
    for number, run in enumerate(runs, start=1):
        if number > 1:
            if draw(st.booleans()):
                gen.entries.append(StatusEntry(State.RETRYING, "TruncatedStreamError", 100.0))
            policy = draw(st.sampled_from(Policy))
            if policy is Policy.RESTART:
                gen.text, gen.tokens, gen.counted = "", 0, []
            gen.entries.append(AttemptEntry(number, "TruncatedStreamError", policy, gen.tokens))
        if not run:
            continue  # an attempt that failed before its first token writes none
        cuts = sorted(draw(st.sets(st.integers(1, len(run) - 1)))) if len(run) > 1 else []
        for begin, end in zip([0, *cuts], [*cuts, len(run)], strict=True):
            size = end - begin
            n = None if size == 1 and draw(st.booleans()) else size
            gen.counted.append(len(gen.entries))
            gen.entries.append(TokenEntry(gen.tokens, "".join(run[begin:end]), n))
            gen.tokens += size
        gen.text += "".join(run)
    gen.entries.append(EndEntry("stop", gen.tokens, attempts=len(runs)))
    return gen


@PROPERTIES
@given(generations())
def test_any_split_into_entries_over_any_attempts_reads_back_as_the_text(gen: Generation) -> None:
    """However the tokens are cut into entries and whatever attempts continue or restart, a
    reader assembles the text since the last restart and the integrity check passes."""
    transcript, check = Transcript(), StreamCheck("k")
    for record in gen.records():
        assert check.check(record) is None
        transcript.add(record.entry)
    assert check.ended
    assert (transcript.text, transcript.tokens, check.tokens) == (gen.text, gen.tokens, gen.tokens)


@PROPERTIES
@given(generations(), st.data())
def test_a_reader_that_resumes_anywhere_passes_the_check(gen: Generation, data: Any) -> None:
    """A reader resuming after any entry (no `start`, the first `seq` taken as given) accepts
    the rest of an intact stream."""
    records = gen.records()
    resume = data.draw(st.integers(0, len(records) - 1))
    check = StreamCheck("k", from_start=False)
    for record in records[resume:]:
        assert check.check(record) is None
    assert check.ended


@PROPERTIES
@given(generations(), st.data())
def test_a_lost_or_repeated_token_entry_is_refused(gen: Generation, data: Any) -> None:
    """Dropping a token entry of the text, or repeating any token entry, is a ProtocolError."""
    repeatable = [i for i, e in enumerate(gen.entries) if isinstance(e, TokenEntry)]
    damaged = list(gen.entries)
    if gen.counted and data.draw(st.booleans()):
        del damaged[data.draw(st.sampled_from(gen.counted))]
    elif repeatable:
        at = data.draw(st.sampled_from(repeatable))
        damaged.insert(at + data.draw(st.integers(1, 2)), damaged[at])
    else:
        return  # a stream without tokens has none to lose
    with pytest.raises(ProtocolError, match="is damaged"):
        check_all(damaged)


def check_all(entries: list[Entry]) -> None:
    """Feed a whole stream to one integrity check, as a reader from its start does."""
    check = StreamCheck("k")
    for i, entry in enumerate(entries):
        check.check(Record(f"{i + 1}-0", entry))
