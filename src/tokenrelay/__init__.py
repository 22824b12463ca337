"""tokenrelay: run LLM generations as queued jobs and stream their tokens through Redis."""

from tokenrelay.errors import (
    ConfigurationError,
    InvalidRequestError,
    JobFailedError,
    JobNotFoundError,
    ProtocolError,
    RedisUnavailableError,
    StreamExpiredError,
    StreamTimeoutError,
    TokenRelayError,
)
from tokenrelay.producer.arelay import AsyncJobHandle, AsyncRelay
from tokenrelay.producer.handle import JobHandle, JobState, Result
from tokenrelay.producer.relay import Relay, submit, submit_many
from tokenrelay.settings import Settings
from tokenrelay.stream.protocol import (
    EndEntry,
    EntryKind,
    ErrorEntry,
    Event,
    LifecycleEvent,
    Record,
    StartEntry,
    TokenEntry,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncJobHandle",
    "AsyncRelay",
    "ConfigurationError",
    "EndEntry",
    "EntryKind",
    "ErrorEntry",
    "Event",
    "InvalidRequestError",
    "JobFailedError",
    "JobHandle",
    "JobNotFoundError",
    "JobState",
    "LifecycleEvent",
    "ProtocolError",
    "Record",
    "RedisUnavailableError",
    "Relay",
    "Result",
    "Settings",
    "StartEntry",
    "StreamExpiredError",
    "StreamTimeoutError",
    "TokenEntry",
    "TokenRelayError",
    "submit",
    "submit_many",
]
