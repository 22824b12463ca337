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
├── StreamTimeoutError      no new entry arrived within the reader's timeout
├── ProtocolError           a stream broke the protocol (a gap in the tokens, an unknown kind)
├── UnsafeJobError          a job payload names a callable other than tokenrelay's generation
├── StreamClosedError       the stream already has its terminal entry (cancelled, reaped)
├── WorkerShutdownError     the worker was shut down while it ran the job (RQ's failure record)
├── WriterFencedError       another writer owns the stream; this one may not write to it
└── GenerationError         the model's stream went wrong
    └── TruncatedStreamError    the model's stream ended without a finish reason
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


class StreamTimeoutError(TokenRelayError, TimeoutError):
    """No new entry arrived within the reader's timeout."""


class ProtocolError(TokenRelayError):
    """A stream broke the protocol: a gap in the token sequence or an unknown entry."""


class UnsafeJobError(TokenRelayError):
    """A job payload names a callable other than tokenrelay's generation function."""


class StreamClosedError(TokenRelayError):
    """The stream already has its terminal entry, so nothing more may be written to it."""


class WorkerShutdownError(TokenRelayError):
    """The worker was shut down (a second Ctrl-C or SIGTERM) while it ran the job."""


class WriterFencedError(TokenRelayError):
    """Another writer owns the job's stream (the job runs twice); this one may not write to it."""


class GenerationError(TokenRelayError):
    """The model's stream went wrong."""


class TruncatedStreamError(GenerationError):
    """The model's stream ended without a finish reason."""
