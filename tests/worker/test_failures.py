"""The one triage of failures: which a new attempt may fix, and how long to wait first."""

from __future__ import annotations

import httpx2
import openai
import pytest
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from tokenrelay.errors import (
    BacklogError,
    FirstTokenTimeoutError,
    StallTimeoutError,
    TruncatedStreamError,
    WorkerLostError,
)
from tokenrelay.worker.failures import error_entry, retry_delay, triage

REQUEST = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers, request=REQUEST)
    kinds = {
        429: openai.RateLimitError,
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
    }
    kind = kinds.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return kind("scripted", response=response, body=None)


@pytest.mark.parametrize(
    "exc",
    [
        status_error(429),
        status_error(500),
        status_error(503),
        status_error(408),
        openai.APIConnectionError(request=REQUEST),
        openai.APIError("an error the server sent mid-stream", REQUEST, body=None),
        TruncatedStreamError("cut"),
        FirstTokenTimeoutError("slow"),
        StallTimeoutError("stalled"),
        BacklogError("held back"),
        JobTimeoutException("long"),
        AbandonedJobError("gone"),
        WorkerLostError("gone"),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status_code", "")),
)
def test_what_may_go_away_by_itself_is_retryable(exc: BaseException) -> None:
    """Rate limits, server errors, broken or cut streams, timeouts, lost workers."""
    assert triage(exc).retryable
    assert error_entry(exc, attempt=1).retryable


@pytest.mark.parametrize(
    "exc",
    [status_error(400), status_error(401), status_error(403), status_error(404), ValueError("x")],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status_code", "")),
)
def test_what_the_server_refused_or_nobody_knows_is_not_retryable(exc: BaseException) -> None:
    """400, 401, 403, 404 answer the same next time; an unknown error is not guessed at."""
    assert not triage(exc).retryable
    assert not error_entry(exc, attempt=1).retryable


def test_a_retry_waits_at_least_what_retry_after_asks() -> None:
    """In seconds, or in milliseconds (`retry-after-ms`), whatever the backoff says."""
    assert triage(status_error(429, {"Retry-After": "7"})).retry_after == 7
    assert triage(status_error(429, {"retry-after-ms": "1500"})).retry_after == 1.5
    failure = triage(status_error(429, {"Retry-After": "7"}))
    assert all(retry_delay(1, failure, base=0.1, ceiling=1) >= 7 for _ in range(20))


def test_backoff_doubles_with_jitter_up_to_its_ceiling() -> None:
    """Attempt n waits between half and all of base * 2^(n-1), at most the ceiling."""
    failure = triage(status_error(500))
    for attempt, top in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 10.0)):
        waits = [retry_delay(attempt, failure, base=1, ceiling=10) for _ in range(50)]
        assert all(top / 2 <= w <= top for w in waits)
