"""One generation, from `start` entry to `end` or `error` entry, as a task of the worker's loop.

It gets everything it uses passed in (`JobRun`): the RQ job, the settings, the process's
stream batcher and model clients. It writes its stream's terminal entry on every path: the
end, a model error, and a stop decided by the worker (a timeout, a stop command, a cancel,
a shutdown), which sets `JobRun.stop` before cancelling the task.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from rq.job import Job

from tokenrelay.errors import (
    GenerationError,
    InvalidRequestError,
    StreamClosedError,
    TruncatedStreamError,
    WriterFencedError,
)
from tokenrelay.producer.request import GenerationRequest, request_from_payload
from tokenrelay.settings import Settings
from tokenrelay.stream.batcher import BatchedStream, StreamBatcher
from tokenrelay.stream.protocol import EndEntry, ErrorEntry, StartEntry
from tokenrelay.worker.attempts import attempt_of
from tokenrelay.worker.llm import ChatModels, error_entry
from tokenrelay.worker.publisher import TokenPublisher
from tokenrelay.worker.streaming import StreamedAnswer, stream_chat

log = structlog.get_logger()

_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AIMessage,
}


@dataclass
class JobRun:
    """One job as its generation runs it, with everything it needs, passed explicitly."""

    job: Job
    settings: Settings
    batcher: StreamBatcher
    models: ChatModels
    worker: str
    #: Why the worker stopped the job, set before it cancels the task: the error entry to end with.
    stop: ErrorEntry | None = None
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def attempt(self) -> int:
        """Which attempt at the job this is."""
        return attempt_of(self.job)


async def generate(run: JobRun) -> dict[str, Any]:
    """Run the job's generation; what RQ stores as its result."""
    job, settings = run.job, run.settings
    try:
        request, ttl = request_from_payload(job.args[0] if job.args else None, job.id, settings)
    except InvalidRequestError as exc:
        await _refuse(run, exc)
        raise
    stream = run.batcher.stream(job.id, ttl=ttl, events_cap=settings.events_max_len)
    model = request.model or settings.model
    max_tokens = request.max_tokens or settings.max_tokens
    started = time.time()
    submitted = job.enqueued_at.timestamp() if job.enqueued_at else None
    start = StartEntry(
        job.id,
        model,
        run.attempt,
        submitted,
        started,
        run.worker,
        max_tokens,
        request.prompt_chars,
        stream.writer_token,
    )
    queue_wait_ms = None if submitted is None else (started - submitted) * 1000
    try:
        try:
            await stream.begin(start, queue=job.origin)
        except WriterFencedError:
            log.error("job.duplicate", reason="another worker is writing this job's stream")
            raise
        log.info(
            "job.started",
            model=model,
            prompt_chars=request.prompt_chars,
            queue_wait_ms=queue_wait_ms,
        )
        answer = await _stream(run, request, stream, max_tokens, started)
    except (StreamClosedError, WriterFencedError) as exc:
        log.info("job.stream_closed", tokens=stream.tokens, reason=str(exc))
        raise
    except asyncio.CancelledError:
        await _end_stopped(run, stream, model)
        raise
    except Exception as exc:
        entry = error_entry(exc, attempt=run.attempt, secret=settings.openai_api_key)
        if await asyncio.shield(
            stream.close(entry, queue=job.origin, model=model, nonce=run.nonce)
        ):
            log.warning(
                "job.failed", error_type=entry.error_type, tokens=stream.tokens, exc_info=True
            )
        # RQ keeps the traceback of what the job raised in Redis: give it the redacted one.
        raise GenerationError(f"{entry.error_type}: {entry.message}") from None
    return await _finish(run, stream, answer, model, started, queue_wait_ms)


async def _refuse(run: JobRun, exc: InvalidRequestError) -> None:
    """End the stream of a job whose payload fails the checks `submit` makes."""
    job, settings = run.job, run.settings
    entry = ErrorEntry("InvalidRequestError", str(exc), retryable=False, attempt=run.attempt)
    stream = run.batcher.stream(job.id, ttl=settings.stream_ttl, events_cap=settings.events_max_len)
    if await stream.close(entry, queue=job.origin, model=None, nonce=run.nonce):
        log.warning("job.refused", reason=str(exc))


async def _stream(
    run: JobRun,
    request: GenerationRequest,
    stream: BatchedStream,
    max_tokens: int,
    started: float,
) -> StreamedAnswer:
    """Stream the model's answer through the publisher into the stream; how it ended."""
    publisher = TokenPublisher(stream, limit=max_tokens, started=started)
    messages = [_MESSAGE_TYPES[m.role](content=m.content) for m in request.messages]
    llm = run.models.for_request(request)
    answer = await stream_chat(llm, messages, [publisher], enough=lambda: publisher.over_limit)
    if publisher.over_limit:  # the server ignored the limit; the worker stopped it there
        answer.finish_reason = "length"
    await stream.drain()
    if answer.finish_reason is None:
        raise TruncatedStreamError("the model's stream ended without a finish reason")
    return answer


async def _end_stopped(run: JobRun, stream: BatchedStream, model: str) -> None:
    """The worker stopped the job: end its stream with the reason the worker gave."""
    entry = run.stop or ErrorEntry(
        "WorkerShutdown", "the worker stopped while running the job", True, run.attempt
    )
    ended = stream.close(entry, queue=run.job.origin, model=model, nonce=run.nonce)
    try:
        if await asyncio.shield(ended):
            log.warning("job.stopped", error_type=entry.error_type, tokens=stream.tokens)
    except (StreamClosedError, WriterFencedError):
        pass  # ended already, or never this attempt's: nothing to end


async def _finish(
    run: JobRun,
    stream: BatchedStream,
    answer: StreamedAnswer,
    model: str,
    started: float,
    queue_wait_ms: float | None,
) -> dict[str, Any]:
    """Write the `end` entry: usage and timings."""
    ended = time.time()
    usage = answer.usage or {}
    assert answer.finish_reason is not None  # _stream raised otherwise
    first = stream.first_token_at
    end = EndEntry(
        finish_reason=answer.finish_reason,
        tokens=stream.tokens,
        prompt_tokens=usage.get("input_tokens"),
        completion_tokens=usage.get("output_tokens"),
        total_tokens=usage.get("total_tokens"),
        queue_wait_ms=queue_wait_ms,
        ttft_ms=None if first is None else (first - started) * 1000,
        duration_ms=(ended - started) * 1000,
    )
    closing = stream.close(end, queue=run.job.origin, model=model, nonce=run.nonce)
    if not await asyncio.shield(closing):
        raise StreamClosedError(f"job {run.job.id} was ended elsewhere before it finished")
    duration = ended - started
    log.info(
        "job.finished",
        finish_reason=end.finish_reason,
        tokens=stream.tokens,
        duration_ms=end.duration_ms,
        tokens_per_s=stream.tokens / duration if duration > 0 else None,
    )
    return {"finish_reason": end.finish_reason, "tokens": stream.tokens, "usage": usage}
