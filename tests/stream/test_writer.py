"""A stream has one writer: every append is fenced, numbered exactly, and refused after the end."""

from __future__ import annotations

import threading

import pytest
from redis import Redis
from support.streams import terminal_entries

from tokenrelay import EndEntry, ErrorEntry, Event, StartEntry, TokenEntry
from tokenrelay.connection import connect
from tokenrelay.errors import ProtocolError, StreamClosedError, WriterFencedError
from tokenrelay.stream.keys import EVENTS_STREAM, stream_state, token_stream
from tokenrelay.stream.protocol import encode, parse_event, records
from tokenrelay.stream.reader import read_stream, scan_stream
from tokenrelay.stream.writer import StreamWriter, close_stream


def begun(client: Redis, job_id: str, *, ttl: int = 60) -> StreamWriter:
    """A writer that has written the job's `start` entry."""
    writer = StreamWriter(client, job_id, ttl=ttl)
    start = StartEntry(job_id, "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token)
    writer.start(start)
    return writer


def texts(client: Redis, job_id: str) -> list[str]:
    """The token texts of the job's stream, as stored."""
    raw = records(client.xrange(token_stream(job_id)))
    return [r.entry.text for r in raw if isinstance(r.entry, TokenEntry)]


def test_a_second_writer_cannot_start_or_append_and_readers_see_one_text(
    redis_client: Redis,
) -> None:
    """Two writers on one stream: the second is refused at once; no reader ever sees its text."""
    a = begun(redis_client, "twice")
    for text in ("A0", "A1", "A2"):
        a.token(text)
    b = StreamWriter(redis_client, "twice", ttl=60)
    with pytest.raises(WriterFencedError):
        b.start(StartEntry("twice", "m", 1, 1.0, 2.0, "w2", 10, 3, b.writer_token))
    for seq in range(4):  # it tries anyway, at every sequence number
        b.tokens = seq
        with pytest.raises(WriterFencedError):
            b.token(f"B{seq}")
    a.token("A3")
    assert a.close(EndEntry("stop", 4))
    assert texts(redis_client, "twice") == ["A0", "A1", "A2", "A3"]
    followed = [r.entry for r in read_stream(redis_client, "twice", timeout=5)]
    scanned = [r.entry for r in scan_stream(redis_client, "twice")]
    assert followed == scanned
    assert "".join(e.text for e in followed if isinstance(e, TokenEntry)) == "A0A1A2A3"


def test_a_token_must_carry_exactly_the_next_sequence_number(redis_client: Redis) -> None:
    """A gap is refused; the writer's own retried append is recognised and not written twice."""
    writer = begun(redis_client, "seq")
    writer.token("a")
    writer.token("b")
    writer.tokens = 1  # as if the reply to the append of "b" was lost and it was sent again
    writer.token("b")
    assert texts(redis_client, "seq") == ["a", "b"]
    writer.tokens = 5
    with pytest.raises(ProtocolError, match="token 2 comes next, not 5"):
        writer.token("f")
    assert texts(redis_client, "seq") == ["a", "b"]


def test_the_first_terminal_entry_wins_and_nothing_follows_it(redis_client: Redis) -> None:
    """close_stream is atomic: a second terminal entry or a late token is refused."""
    writer = begun(redis_client, "race")
    writer.token("a")
    assert close_stream(redis_client, "race", ErrorEntry("cancelled", "m", False), ttl=60)
    assert not close_stream(redis_client, "race", EndEntry("stop", 1), ttl=60)
    assert not writer.close(EndEntry("stop", 1))
    with pytest.raises(StreamClosedError):
        writer.token("b")
    assert [type(e) for e in terminal_entries(redis_client, "race")] == [ErrorEntry]
    assert 0 < redis_client.ttl(token_stream("race")) <= 60


def test_a_writer_cannot_end_a_stream_another_writer_owns(redis_client: Redis) -> None:
    """The generation's own `end` is fenced too; a cancel (no writer token) still ends it."""
    begun(redis_client, "owned")
    stranger = StreamWriter(redis_client, "owned", ttl=60)
    with pytest.raises(WriterFencedError):
        stranger.close(EndEntry("stop", 0))
    assert close_stream(redis_client, "owned", ErrorEntry("cancelled", "m", False), ttl=60)


def test_a_stream_ended_before_it_started_refuses_its_start(redis_client: Redis) -> None:
    """A job cancelled while queued: the worker's start is refused as closed, not fenced."""
    close_stream(redis_client, "early", ErrorEntry("cancelled", "m", False), ttl=60)
    writer = StreamWriter(redis_client, "early", ttl=60)
    with pytest.raises(StreamClosedError):
        writer.start(StartEntry("early", "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token))


def test_a_retried_start_or_close_is_written_once(redis_client: Redis) -> None:
    """redis-py re-sends a command whose reply was lost; neither entry is written twice."""
    writer = begun(redis_client, "again")
    start = StartEntry("again", "m", 1, 1.0, 2.0, "w", 10, 3, writer.writer_token)
    writer.start(start)  # the retry
    end = EndEntry("stop", 0, duration_ms=5.0)
    assert close_stream(redis_client, "again", end, ttl=60, nonce="n1")
    assert close_stream(redis_client, "again", end, ttl=60, nonce="n1")  # the retry
    assert not close_stream(redis_client, "again", end, ttl=60, nonce="n2")  # someone else
    assert redis_client.xlen(token_stream("again")) == 2
    events = [parse_event(f).event for _, f in redis_client.xrange(EVENTS_STREAM)]
    assert events == [Event.STARTED, Event.FINISHED]


def test_appends_keep_a_long_generation_from_expiring(redis_client: Redis) -> None:
    """Each append renews the stream's expiry: a generation longer than its TTL keeps its stream."""
    writer = begun(redis_client, "long", ttl=30)
    redis_client.expire(token_stream("long"), 2)  # as if 28 of its 30 seconds had passed
    redis_client.expire(stream_state("long"), 2)
    writer.token("still here")
    assert redis_client.ttl(token_stream("long")) > 2
    assert redis_client.ttl(stream_state("long")) > 2


def test_concurrent_writers_of_one_stream_leave_one_consistent_text(redis_url: str) -> None:
    """Two writers racing from two connections: exactly one starts, only its tokens land."""
    outcomes: dict[str, str] = {}

    def race(name: str) -> None:
        client = connect(redis_url)
        writer = StreamWriter(client, "racing", ttl=60)
        try:
            start = StartEntry("racing", "m", 1, 1.0, 2.0, name, 10, 3, writer.writer_token)
            writer.start(start)
            for i in range(50):
                writer.token(f"{name}{i} ")
            writer.close(EndEntry("stop", 50))
            outcomes[name] = "wrote"
        except WriterFencedError:
            outcomes[name] = "fenced"
        finally:
            client.close()

    threads = [threading.Thread(target=race, args=(name,)) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes.values()) == ["fenced", "wrote"]
    [winner] = [name for name, outcome in outcomes.items() if outcome == "wrote"]
    client = connect(redis_url)
    entries = [r.entry for r in scan_stream(client, "racing")]
    client.close()
    assert "".join(e.text for e in entries if isinstance(e, TokenEntry)) == "".join(
        f"{winner}{i} " for i in range(50)
    )


def test_every_reader_refuses_a_stream_that_breaks_the_rules(redis_client: Redis) -> None:
    """A stream written around the scripts (a gap, a repeat) is damaged for every reader alike."""
    for job_id, seqs in (("gappy", [0, 1, 3]), ("repeated", [0, 1, 1])):
        key = token_stream(job_id)
        redis_client.xadd(key, encode(StartEntry(job_id, "m", 1, 1.0, 2.0, "w", 10, 3)))  # type: ignore[arg-type]
        for seq in seqs:
            redis_client.xadd(key, encode(TokenEntry(seq, f"t{seq}")))  # type: ignore[arg-type]
        redis_client.xadd(key, encode(EndEntry("stop", 3)))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="token 2 expected, got 3 \\(a token is missing\\)"):
        list(read_stream(redis_client, "gappy", timeout=5))
    with pytest.raises(ProtocolError, match="token 2 expected, got 1 \\(a token is repeated\\)"):
        list(scan_stream(redis_client, "repeated"))


def test_a_writer_whose_state_vanished_stops_and_the_stream_can_still_be_ended(
    redis_client: Redis,
) -> None:
    """State evicted or deleted under a writer: its appends stop; a clean-up still ends it."""
    writer = begun(redis_client, "unfenced")
    writer.token("a")
    redis_client.delete(stream_state("unfenced"))
    with pytest.raises(StreamClosedError, match="is gone"):
        writer.token("b")
    assert close_stream(redis_client, "unfenced", ErrorEntry("Lost", "state gone", True), ttl=60)
    assert texts(redis_client, "unfenced") == ["a"]
    assert [type(e) for e in terminal_entries(redis_client, "unfenced")] == [ErrorEntry]


def test_an_append_never_recreates_a_stream_that_vanished(redis_client: Redis) -> None:
    """Stream deleted under its writer: the next append is refused, not a headless new stream."""
    writer = begun(redis_client, "deleted")
    redis_client.delete(token_stream("deleted"))
    with pytest.raises(StreamClosedError):
        writer.token("orphan")
    assert not redis_client.exists(token_stream("deleted"))
