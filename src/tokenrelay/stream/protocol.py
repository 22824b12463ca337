"""The stream protocol: the typed entries of a job's token stream and of the lifecycle stream.

Every entry is a flat map of strings, readable with `redis-cli XRANGE`. Its first
field is `kind` (token streams) or `event` (the lifecycle stream); the rest are
the fields of the dataclass below, in order, with absent optional values left out.
`docs/protocol.md` is the written contract; this module is its one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, get_type_hints

from tokenrelay.errors import ProtocolError

PROTOCOL_VERSION = 3


class EntryKind(StrEnum):
    """The kinds of entry in a job's token stream."""

    START = "start"
    TOKEN = "token"
    ATTEMPT = "attempt"
    STATUS = "status"
    END = "end"
    ERROR = "error"
    GAP = "gap"  # made by readers, never written: entries were trimmed before they were read


class Event(StrEnum):
    """The job state changes recorded in the lifecycle stream."""

    SUBMITTED = "submitted"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StartEntry:
    """The first entry of a stream: which job, which model, which attempt, and when."""

    kind: ClassVar[EntryKind] = EntryKind.START
    job_id: str
    model: str
    attempt: int
    submitted_at: float | None
    started_at: float
    worker: str
    max_tokens: int
    prompt_chars: int
    writer: str = ""  # the attempt's writer token: only it may append to the stream
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TokenEntry:
    """Generated text: `n` tokens (absent: one), the first numbered `seq`, counted from 0.

    A worker writes the tokens that arrived while its previous write was in flight as one
    entry, so the next entry's `seq` is this one's `seq + n`: a reader still spots a gap or
    a repeat.
    """

    kind: ClassVar[EntryKind] = EntryKind.TOKEN
    seq: int
    text: str
    n: int | None = None

    @property
    def count(self) -> int:
        """How many tokens the entry holds."""
        return 1 if self.n is None else self.n


class Policy(StrEnum):
    """What a new attempt does with the text of the ones before it."""

    CONTINUE = "continue"  # the model is asked to go on from the text so far: keep it
    RESTART = "restart"  # the model starts over: readers drop the text so far


@dataclass(frozen=True)
class AttemptEntry:
    """A new attempt at the generation begins, after `reason` ended the one before.

    With `continue`, its tokens go on from `from_seq`; with `restart`, they count from 0
    again and readers drop the text of the attempts before.
    """

    kind: ClassVar[EntryKind] = EntryKind.ATTEMPT
    attempt: int
    reason: str
    policy: Policy
    from_seq: int


class State(StrEnum):
    """What a `status` entry says is happening."""

    STALLED = "stalled"  # the worker running the job stopped renewing its lease
    RETRYING = "retrying"  # the attempt failed; the next one starts after a wait


@dataclass(frozen=True)
class StatusEntry:
    """News for readers while no tokens come: the job stalled, or will retry (and when)."""

    kind: ClassVar[EntryKind] = EntryKind.STATUS
    state: State
    detail: str
    retry_in_ms: float | None = None


@dataclass(frozen=True)
class GapEntry:
    """Made by a reader, never written: the stream lost tokens `first_seq` to `last_seq` to
    its length cap (TOKENRELAY_STREAM_MAXLEN) before the reader got to them."""

    kind: ClassVar[EntryKind] = EntryKind.GAP
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class EndEntry:
    """The terminal entry of a successful generation, with its usage and timings.

    `tokens` counts the text's tokens (with the restart policy, the last attempt's); the usage
    covers every attempt (`attempts`), as far as the model reported it.
    """

    kind: ClassVar[EntryKind] = EntryKind.END
    finish_reason: str
    tokens: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    queue_wait_ms: float | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    attempts: int = 1


@dataclass(frozen=True)
class ErrorEntry:
    """The terminal entry of a generation that did not succeed."""

    kind: ClassVar[EntryKind] = EntryKind.ERROR
    error_type: str
    message: str
    retryable: bool
    attempt: int = 1


Entry = StartEntry | TokenEntry | AttemptEntry | StatusEntry | GapEntry | EndEntry | ErrorEntry
Terminal = EndEntry | ErrorEntry
TERMINAL_KINDS = frozenset({EntryKind.END, EntryKind.ERROR})

#: The `error_type` of a job cancelled by its submitter.
CANCELLED = "cancelled"


@dataclass(frozen=True)
class LifecycleEvent:
    """One job state change in the lifecycle stream."""

    event: Event
    job_id: str
    at: float
    queue: str | None = None
    model: str | None = None
    error_type: str | None = None


class Record(NamedTuple):
    """An entry together with its stream entry id."""

    id: str
    entry: Entry


_ENTRY_CLASSES: dict[str, type[Entry]] = {
    cls.kind.value: cls
    for cls in (StartEntry, TokenEntry, AttemptEntry, StatusEntry, EndEntry, ErrorEntry)
}


def _encode_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 3))
    return str(value)


def _decode_bool(raw: str) -> bool:
    if raw not in ("true", "false"):
        raise ValueError(f"not a boolean: {raw!r}")
    return raw == "true"


_CASTS: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    bool: _decode_bool,
    int | None: int,
    float | None: float,
    str | None: str,
    Event: Event,
    Policy: Policy,
    State: State,
}


_SCHEMAS: dict[type, tuple[tuple[str, Callable[[str], Any]], ...]] = {}
_OPTIONAL: dict[type, frozenset[str]] = {}


def _schema(cls: type) -> tuple[tuple[str, Callable[[str], Any]], ...]:
    """Each field's name and the function that parses it, in order (computed once per class)."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = get_type_hints(cls)
        schema = _SCHEMAS[cls] = tuple((f.name, _CASTS[hints[f.name]]) for f in fields(cls))
        # Fields that may be None are written only when known: absent, they are None.
        _OPTIONAL[cls] = frozenset(
            f.name for f in fields(cls) if type(None) in getattr(hints[f.name], "__args__", ())
        )
    return schema


def encode(entry: Entry) -> dict[str, str]:
    """The flat string fields of a token-stream entry, `kind` first."""
    out = {"kind": entry.kind.value}
    for name, _ in _schema(type(entry)):
        value = getattr(entry, name)
        if value is not None:
            out[name] = _encode_value(value)
    return out


def encode_event(event: LifecycleEvent) -> dict[str, str]:
    """The flat string fields of a lifecycle entry, `event` first."""
    return {
        name: _encode_value(getattr(event, name))
        for name, _ in _schema(LifecycleEvent)
        if getattr(event, name) is not None
    }


def text(value: bytes | str) -> str:
    """A string from Redis, which returns bytes to clients made for RQ (the one decoding rule)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _build(cls: type[Any], data: Mapping[str, str]) -> Any:
    values: dict[str, Any] = {}
    for name, cast in _schema(cls):
        if name in data:
            values[name] = cast(data[name])
        elif name in _OPTIONAL[cls]:
            values[name] = None
    try:
        return cls(**values)
    except TypeError as exc:
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None


def _decoded(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str]:
    try:
        return {text(k): text(v) for k, v in raw.items()}
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"an entry that is not UTF-8: {exc}") from None


def parse(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> Entry:
    """The typed entry for a token-stream entry's fields, as Redis returns them."""
    data = _decoded(raw)
    kind = data.pop("kind", None)
    cls = _ENTRY_CLASSES.get(kind or "")
    if cls is None:
        raise ProtocolError(f"unknown entry kind {kind!r}")
    try:
        entry: Entry = _build(cls, data)
    except ValueError as exc:
        raise ProtocolError(f"malformed {kind} entry: {exc}") from None
    return entry


def parse_event(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> LifecycleEvent:
    """The typed lifecycle event for a lifecycle-stream entry's fields."""
    data = _decoded(raw)
    try:
        event: LifecycleEvent = _build(LifecycleEvent, data)
    except ValueError as exc:
        raise ProtocolError(f"malformed lifecycle entry: {exc}") from None
    return event


def records(raw: Any) -> list[Record]:
    """Typed records from a raw XRANGE/XREVRANGE reply (or one stream of an XREAD reply)."""
    return [Record(text(entry_id), parse(fields)) for entry_id, fields in raw]


def is_terminal(entry: Entry) -> bool:
    """Whether the entry ends its stream."""
    return entry.kind in TERMINAL_KINDS


def ended_as(entry: Terminal) -> Event:
    """The lifecycle event a terminal entry stands for: finished, failed or cancelled."""
    if isinstance(entry, EndEntry):
        return Event.FINISHED
    return Event.CANCELLED if entry.error_type == CANCELLED else Event.FAILED
