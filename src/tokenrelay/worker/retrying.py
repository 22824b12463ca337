"""Attempts at a generation: run them until one ends well, retrying what may succeed.

A failure worth retrying (`worker.failures.triage`) is followed, while attempts are left
(TOKENRELAY_MAX_ATTEMPTS), by a `status: retrying` entry with the wait (backoff with jitter,
never less than a 429's `Retry-After`), then an `attempt` entry and the next attempt. With
the `continue` policy it asks the model to go on from the text so far (`worker.continuation`);
with `restart`, it asks again from the start and readers drop the text before.
"""

from __future__ import annotations

import asyncio

import structlog
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from tokenrelay.errors import (
    RedisUnavailableError,
    StreamClosedError,
    TruncatedStreamError,
    WriterFencedError,
)
from tokenrelay.producer.request import GenerationRequest
from tokenrelay.stream.batched import BatchedStream
from tokenrelay.stream.protocol import AttemptEntry, Policy, State, StatusEntry
from tokenrelay.worker.continuation import Seam, continuation
from tokenrelay.worker.failures import redacted, retry_delay, triage
from tokenrelay.worker.publisher import TokenPublisher
from tokenrelay.worker.run import JobRun, Usage
from tokenrelay.worker.streaming import StreamedAnswer, stream_chat
from tokenrelay.worker.watchdog import Watchdog

log = structlog.get_logger()

_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AIMessage,
}

#: The longest `detail` of a `status` entry.
_MAX_DETAIL = 300


async def run_attempts(
    run: JobRun,
    request: GenerationRequest,
    stream: BatchedStream,
    max_tokens: int,
    started: float,
    so_far: str,
    usage: Usage,
) -> StreamedAnswer:
    """Run attempts until one ends well; raises the last failure when retrying is over."""
    settings = run.settings
    policy = Policy(settings.retry_policy)
    messages = [_MESSAGE_TYPES[m.role](content=m.content) for m in request.messages]
    while True:
        before = stream.tokens
        try:
            answer = await _attempt(run, request, stream, messages, so_far, max_tokens, started)
        except (StreamClosedError, WriterFencedError, RedisUnavailableError):
            raise
        except Exception as exc:
            usage.add(None, stream.tokens - before)
            failure = triage(exc)
            if not failure.retryable or run.attempt >= settings.max_attempts:
                raise
            delay = retry_delay(
                run.attempt, failure, base=settings.retry_delay, ceiling=settings.retry_max_delay
            )
            reason = type(exc).__name__
            log.warning(
                "job.attempt_failed",
                attempt=run.attempt,
                error_type=reason,
                tokens=stream.tokens,
                retry_in_s=round(delay, 3),
            )
            detail = f"{reason}: {redacted(exc, settings.openai_api_key)}"[:_MAX_DETAIL]
            await stream.status(StatusEntry(State.RETRYING, detail, round(delay * 1000, 3)))
            await asyncio.sleep(delay)
            so_far = stream.text if policy == Policy.CONTINUE else ""
            run.begin_attempt(run.attempt + 1)
            from_seq = stream.tokens if policy == Policy.CONTINUE else 0
            await stream.new_attempt(
                AttemptEntry(run.attempt, reason, policy, from_seq), streamed=stream.tokens - before
            )
            continue
        usage.add(answer, stream.tokens - before)
        return answer


async def _attempt(
    run: JobRun,
    request: GenerationRequest,
    stream: BatchedStream,
    messages: list[BaseMessage],
    so_far: str,
    max_tokens: int,
    started: float,
) -> StreamedAnswer:
    """One attempt: stream the model's answer (or the rest of it) into the stream."""
    settings = run.settings
    left = max_tokens - stream.tokens
    llm = run.models.for_request(request, max_tokens=max(left, 1))
    async with Watchdog(
        first_token=request.first_token_timeout or settings.first_token_timeout,
        stall=request.stall_timeout or settings.stall_timeout,
        whole=request.attempt_timeout or settings.attempt_timeout or None,
    ) as watchdog:
        publisher = TokenPublisher(
            stream, limit=max_tokens, started=started, watchdog=watchdog, seam=Seam(so_far)
        )
        try:
            answer = await stream_chat(
                llm,
                continuation(messages, so_far),
                [publisher],
                enough=lambda: publisher.over_limit,
            )
        finally:
            if stream.error is None:
                publisher.flush()  # what the seam still holds is text the model sent
    if publisher.over_limit:  # the server ignored the limit; the worker stopped it there
        answer.finish_reason = "length"
    await stream.drain()
    if answer.finish_reason is None:
        raise TruncatedStreamError("the model's stream ended without a finish reason")
    return answer
