"""What went wrong with an attempt, in words and in kind: retry it (and when), or give up.

The one triage of failures, for the retry loop (`worker.generation`) and for every `error`
entry (`error_entry`): rate limits (429, honouring `Retry-After`), server errors (5xx, 408,
409), connections refused, reset or dropped mid-answer, streams cut before their finish
reason, first-token, stall and attempt timeouts, and a Redis outage that outlasted the held-back
tokens' bound are retried; a request the model server refused (400, 401, 403, 404, a
context too long) fails at once, as does anything unknown.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import openai
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from tokenrelay.errors import GenerationError, WorkerLostError
from tokenrelay.settings import Secret
from tokenrelay.stream.protocol import ErrorEntry

#: Statuses the model server may answer differently next time (as the OpenAI client retries).
_RETRYABLE_STATUS = frozenset({408, 409, 429})

#: Failures that may go away by themselves, whatever else they are: what a new attempt (or a
#: new submission) could fix.
_TRANSIENT = (
    GenerationError,  # cut streams, the attempt time limits, a backlog during an outage
    JobTimeoutException,
    AbandonedJobError,
    WorkerLostError,
)

_MAX_MESSAGE = 1000

#: What happened, for the exceptions RQ raises without a message.
_MESSAGES: dict[type[BaseException], str] = {
    AbandonedJobError: "the worker running the job died or vanished (its heartbeat lapsed)",
    JobTimeoutException: "the job ran longer than its timeout",
}


@dataclass(frozen=True)
class Failure:
    """One failed attempt: whether a new attempt may fix it, and the least wait before one."""

    retryable: bool
    retry_after: float | None = None  # seconds the server asked for (`Retry-After`)


def triage(exc: BaseException) -> Failure:
    """Whether a new attempt may succeed after `exc` (and the server's `Retry-After`): the one
    rule for the retry loop and for every `error` entry's `retryable`."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in _RETRYABLE_STATUS or status >= 500
        return Failure(retryable, _retry_after(exc) if retryable else None)
    # Connections refused, reset or dropped, and errors the server sent mid-stream.
    return Failure(isinstance(exc, (openai.APIError, *_TRANSIENT)))


def _retry_after(exc: openai.APIStatusError) -> float | None:
    """The wait the server asked for, from `retry-after-ms` or `Retry-After` (seconds or a date)."""
    headers = exc.response.headers
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def retry_delay(attempt: int, failure: Failure, *, base: float, ceiling: float) -> float:
    """Seconds to wait after attempt number `attempt` failed: doubling from `base` up to
    `ceiling`, drawn from the upper half (jitter), and never less than the server asked."""
    backoff = min(ceiling, base * 2 ** (attempt - 1))
    delay = random.uniform(backoff / 2, backoff)
    return max(delay, failure.retry_after or 0.0)


def describe(exc: BaseException) -> str:
    """What went wrong, in words: the client's own message, and for a connection error its cause.

    The OpenAI client says only "Connection error." whatever happened; the innermost cause
    says whether the server refused the connection, closed it mid-answer, or never answered.
    """
    message = str(exc) or _MESSAGES.get(type(exc), f"{type(exc).__name__} was raised")
    if not isinstance(exc, openai.APIConnectionError):
        return message
    request = getattr(exc, "request", None)
    where = f" at {request.url.scheme}://{request.url.netloc.decode()}" if request else ""
    root, cause = None, exc.__cause__ or exc.__context__
    while cause is not None:
        root = cause if str(cause) else root
        cause = cause.__cause__ or cause.__context__
    why = f": {type(root).__name__}: {root}" if root is not None else ""
    return f"{message.rstrip('.')} talking to the model server{where}{why}"


def redacted(exc: BaseException, secret: Secret | None) -> str:
    """`describe(exc)`, without the API key (some servers quote it), cut to a sane length."""
    message = describe(exc)
    if secret:
        message = message.replace(secret.reveal(), "**********")
    return message[:_MAX_MESSAGE]


def error_entry(exc: BaseException, *, attempt: int, secret: Secret | None = None) -> ErrorEntry:
    """The `error` entry for an exception: its type, a redacted message, whether to retry."""
    return ErrorEntry(
        error_type=type(exc).__name__,
        message=redacted(exc, secret),
        retryable=triage(exc).retryable,
        attempt=attempt,
    )
