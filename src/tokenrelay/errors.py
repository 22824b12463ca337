"""Every exception tokenrelay raises, in one tree.

TokenRelayError
├── ConfigurationError      a setting is missing or malformed
├── LocalModelError         the local model server did not start, or died
├── InvalidRequestError     a generation request was refused before anything was queued
│   └── BatchInterruptedError   a batch stopped partway; the jobs queued before are in `.queued`
├── RedisUnavailableError   Redis cannot be reached at the configured URL
├── JobNotFoundError        no job (and no stream) exists under that id
│   └── StreamExpiredError      the stream disappeared (expired, deleted) while being read
├── JobFailedError          the job's stream ended with an `error` entry
├── StreamGapError          the text has a gap: a capped stream lost tokens before they were read
├── StreamTimeoutError      no new entry arrived within the reader's timeout
├── ReaderLaggedError       a follower of a shared reader fell too far behind; resume from Redis
├── ProtocolError           a stream broke the protocol (a gap in the tokens, an unknown kind)
├── UnsafeJobError          a job payload names a callable other than tokenrelay's generation
├── StreamClosedError       the stream already has its terminal entry (cancelled, reaped)
│   └── StreamLostError         the stream (or its state) vanished under its writer
├── WorkerShutdownError     the worker was shut down while it ran the job (RQ's failure record)
├── WriterFencedError       another writer owns the stream; this one may not write to it
├── WorkerLostError         the workers running a job kept dying; its attempts ran out
└── GenerationError         the model's stream went wrong (an attempt ends; it may be retried)
    ├── TruncatedStreamError    the model's stream ended without a finish reason
    ├── FirstTokenTimeoutError  no token came within the first-token timeout
    ├── StallTimeoutError       no token came within the stall timeout of the one before
    ├── AttemptTimeoutError     an attempt took longer in all than the attempt timeout
    └── BacklogError            Redis was away so long that the held-back tokens hit their bound
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenrelay.stream.protocol import ErrorEntry


class TokenRelayError(Exception):
    """Base class of every tokenrelay exception."""


class ConfigurationError(TokenRelayError):
    """A setting is missing or malformed."""


class LocalModelError(TokenRelayError):
    """The local model server (`tokenrelay llm serve`, the demo's) did not start, or died."""


class InvalidRequestError(TokenRelayError, ValueError):
    """A generation request was refused before anything was queued."""


class BatchInterruptedError(InvalidRequestError):
    """A batch stopped partway (another submitter took one of its job ids meanwhile).

    The jobs queued before the failing chunk stay queued; their handles are in `queued`.
    """

    def __init__(self, message: str, queued: list[Any]) -> None:
        super().__init__(message)
        self.queued = queued


class RedisUnavailableError(TokenRelayError):
    """Redis cannot be reached at the configured URL."""


class JobNotFoundError(TokenRelayError, LookupError):
    """No job and no stream exist under that id (it may have expired)."""


class StreamExpiredError(JobNotFoundError):
    """The job's stream disappeared (it expired or was deleted) while a reader waited on it."""


class JobFailedError(TokenRelayError):
    """The job's stream ended with an `error` entry."""

    def __init__(self, error: ErrorEntry) -> None:
        super().__init__(f"{error.error_type}: {error.message}")
        self.error = error


class StreamGapError(TokenRelayError):
    """The text has a gap: the stream's length cap trimmed tokens before they were read."""

    def __init__(self, first_seq: int, last_seq: int) -> None:
        super().__init__(
            f"tokens {first_seq} to {last_seq} were trimmed from the stream (its length cap, "
            "TOKENRELAY_STREAM_MAXLEN) before they were read"
        )
        self.first_seq = first_seq
        self.last_seq = last_seq


class StreamTimeoutError(TokenRelayError, TimeoutError):
    """No new entry arrived within the reader's timeout."""


class ReaderLaggedError(TokenRelayError):
    """A follower of the shared reader fell so far behind that its bounded queue overflowed.

    Nothing was lost: the entries are in Redis, and a read resumed after `last_id` (the last
    entry the follower was given) gets every one of them.
    """

    def __init__(self, last_id: str) -> None:
        super().__init__(f"the reader fell too far behind after entry {last_id}; resume from there")
        self.last_id = last_id


class ProtocolError(TokenRelayError):
    """A stream broke the protocol: a gap in the token sequence or an unknown entry."""


class UnsafeJobError(TokenRelayError):
    """A job payload names a callable other than tokenrelay's generation function."""


class StreamClosedError(TokenRelayError):
    """The stream already has its terminal entry, so nothing more may be written to it."""


class StreamLostError(StreamClosedError):
    """The stream, or its state, vanished under its writer (expired, deleted, or lost with a
    Redis that came back without its data)."""


class WorkerShutdownError(TokenRelayError):
    """The worker was shut down (a second Ctrl-C or SIGTERM) while it ran the job."""


class WriterFencedError(TokenRelayError):
    """Another writer owns the job's stream (the job runs twice); this one may not write to it."""


class WorkerLostError(TokenRelayError):
    """The workers running a job kept dying (their leases lapsed) until its attempts ran out."""


class GenerationError(TokenRelayError):
    """The model's stream went wrong."""


class TruncatedStreamError(GenerationError):
    """The model's stream ended without a finish reason."""


class FirstTokenTimeoutError(GenerationError, TimeoutError):
    """No token came within the first-token timeout of the request."""


class StallTimeoutError(GenerationError, TimeoutError):
    """No token came within the stall timeout of the one before."""


class AttemptTimeoutError(GenerationError, TimeoutError):
    """An attempt took longer in all than the attempt timeout of the request."""


class BacklogError(GenerationError):
    """Redis was away so long that the tokens held back for it reached their bound."""
