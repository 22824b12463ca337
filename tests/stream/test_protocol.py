"""The stream protocol: entries as flat strings, parsed back to the same typed values."""

from __future__ import annotations

import pytest

from tokenrelay import EndEntry, ErrorEntry, Event, LifecycleEvent, StartEntry, TokenEntry
from tokenrelay.errors import ProtocolError
from tokenrelay.stream.protocol import encode, encode_event, parse, parse_event

ENTRIES = [
    StartEntry("job-1", "gpt-x", 1, 1700000000.5, 1700000001.25, "worker-a", 64, 12),
    TokenEntry(0, "héllo 👋 \n"),
    EndEntry("stop", 3, 5, 3, 8, 12.5, 40.25, 99.0),
    EndEntry("length", 0),
    ErrorEntry("InternalServerError", "boom", True, 2),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: type(e).__name__)
def test_every_entry_survives_a_round_trip_through_redis_bytes(entry: object) -> None:
    """Encoding to strings, as bytes from Redis, and parsing gives the same entry back."""
    fields = encode(entry)  # type: ignore[arg-type]  # parametrize loses the union type
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}
    assert parse(as_bytes) == entry
    assert all(isinstance(v, str) for v in fields.values())


def test_kind_comes_first_and_absent_values_are_left_out() -> None:
    """An entry starts with its kind, and optional values that are None are not written."""
    fields = encode(EndEntry("stop", 2))
    assert next(iter(fields)) == "kind"
    assert fields == {"kind": "end", "finish_reason": "stop", "tokens": "2", "attempts": "1"}


def test_booleans_are_written_as_words() -> None:
    """A boolean reads as true/false in redis-cli, not as 1/0 or True/False."""
    assert encode(ErrorEntry("E", "m", False))["retryable"] == "false"


def test_start_entries_carry_the_protocol_version() -> None:
    """Readers can tell which protocol version wrote a stream."""
    assert encode(ENTRIES[0])["v"] == "3"  # type: ignore[arg-type]


def test_an_unknown_kind_is_a_protocol_error() -> None:
    """A reader refuses an entry it does not understand rather than guessing."""
    with pytest.raises(ProtocolError, match="unknown entry kind 'telemetry'"):
        parse({b"kind": b"telemetry"})


def test_a_malformed_field_is_a_protocol_error() -> None:
    """A token whose sequence number is not a number is refused."""
    with pytest.raises(ProtocolError, match="malformed token"):
        parse({b"kind": b"token", b"seq": b"x", b"text": b"a"})


def test_a_missing_field_is_a_protocol_error() -> None:
    """A token without its text is refused."""
    with pytest.raises(ProtocolError, match="malformed TokenEntry"):
        parse({b"kind": b"token", b"seq": b"0"})


def test_lifecycle_events_round_trip() -> None:
    """Lifecycle entries start with their event and parse back to the same value."""
    event = LifecycleEvent(Event.FAILED, "job-1", 1700000000.125, "q", None, "JobTimeoutException")
    fields = encode_event(event)
    assert next(iter(fields)) == "event"
    assert "model" not in fields
    assert parse_event({k.encode(): v.encode() for k, v in fields.items()}) == event


def test_a_token_entry_holds_one_token_unless_it_says_how_many() -> None:
    """`n` is written only for coalesced entries; readers count it, 1 when absent."""
    single, several = TokenEntry(0, "a"), TokenEntry(1, "bcd", 3)
    assert "n" not in encode(single)
    assert encode(several)["n"] == "3"
    assert (single.count, several.count) == (1, 3)
    assert parse(encode(several)) == several  # type: ignore[arg-type]
