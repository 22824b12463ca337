"""The job function: one generation, from `start` entry to `end` or `error` entry."""

from __future__ import annotations

import time
from contextlib import closing
from contextvars import ContextVar
from typing import Any

import structlog
from langchain_core.messages import AIMessage as AssistantMessage
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from redis import Redis
from rq import get_current_job
from rq.job import Job

from tokenrelay.errors import (
    ConfigurationError,
    GenerationError,
    InvalidRequestError,
    StreamClosedError,
    TruncatedStreamError,
    WriterFencedError,
)
from tokenrelay.producer.request import GenerationRequest, request_from_payload
from tokenrelay.settings import Settings
from tokenrelay.stream.protocol import EndEntry, ErrorEntry, StartEntry
from tokenrelay.stream.writer import StreamWriter, close_stream
from tokenrelay.worker.attempts import attempt_of
from tokenrelay.worker.llm import chat_model, error_entry
from tokenrelay.worker.publisher import TokenPublisher
from tokenrelay.worker.streaming import StreamedAnswer, stream_chat

log = structlog.get_logger()

#: The running worker's settings, set by `RelayWorker` around each job.
worker_settings: ContextVar[Settings] = ContextVar("tokenrelay_worker_settings")

_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AssistantMessage,
}


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run the generation carried by the current RQ job; RQ stores the returned summary."""
    job = get_current_job()
    try:
        settings = worker_settings.get()
    except LookupError:
        raise ConfigurationError("tokenrelay jobs run only in `tokenrelay worker`") from None
    assert job is not None, "generate runs inside an RQ job"
    return _run(job, payload, settings)


def _refuse(job: Job, exc: InvalidRequestError, settings: Settings) -> None:
    """End the stream of a job whose payload fails the checks `submit` makes."""
    entry = ErrorEntry("InvalidRequestError", str(exc), retryable=False, attempt=attempt_of(job))
    closed = close_stream(
        job.connection,
        job.id,
        entry,
        ttl=settings.stream_ttl,
        queue=job.origin,
        events_cap=settings.events_max_len,
    )
    if closed:
        log.warning("job.refused", reason=str(exc))


def _run(job: Job, payload: Any, settings: Settings) -> dict[str, Any]:
    client: Redis = job.connection
    try:
        request, ttl = request_from_payload(payload, job.id, settings)
    except InvalidRequestError as exc:
        _refuse(job, exc, settings)
        raise
    model = request.model or settings.model
    max_tokens = request.max_tokens or settings.max_tokens
    started = time.time()
    submitted = job.enqueued_at.timestamp() if job.enqueued_at else None
    writer = StreamWriter(client, job.id, ttl=ttl, events_cap=settings.events_max_len)
    start = StartEntry(
        job.id,
        model,
        attempt_of(job),
        submitted,
        started,
        job.worker_name or "",
        max_tokens,
        request.prompt_chars,
        writer.writer_token,
    )
    try:
        writer.start(start, queue=job.origin)
    except WriterFencedError:
        log.error("job.duplicate", reason="another worker is writing this job's stream")
        raise
    queue_wait_ms = None if submitted is None else (started - submitted) * 1000
    log.info(
        "job.started", model=model, prompt_chars=request.prompt_chars, queue_wait_ms=queue_wait_ms
    )
    try:
        answer = _stream(chat_model(settings, request), request, writer, max_tokens, started)
    except (StreamClosedError, WriterFencedError):
        log.info("job.cancelled", tokens=writer.tokens)
        raise
    except Exception as exc:
        entry = error_entry(exc, attempt=attempt_of(job), secret=settings.openai_api_key)
        if writer.close(entry, queue=job.origin, model=model):
            log.warning(
                "job.failed", error_type=entry.error_type, tokens=writer.tokens, exc_info=True
            )
        # RQ keeps the traceback of what the job raised in Redis: give it the redacted one.
        raise GenerationError(f"{entry.error_type}: {entry.message}") from None
    ended = time.time()
    usage = answer.usage or {}
    assert answer.finish_reason is not None  # _stream raised otherwise
    end = EndEntry(
        finish_reason=answer.finish_reason,
        tokens=writer.tokens,
        prompt_tokens=usage.get("input_tokens"),
        completion_tokens=usage.get("output_tokens"),
        total_tokens=usage.get("total_tokens"),
        queue_wait_ms=queue_wait_ms,
        ttft_ms=None if writer.first_token_at is None else (writer.first_token_at - started) * 1000,
        duration_ms=(ended - started) * 1000,
    )
    if not writer.close(end, queue=job.origin, model=model):
        raise StreamClosedError(f"job {job.id} was ended elsewhere before it finished")
    duration = ended - started
    log.info(
        "job.finished",
        finish_reason=end.finish_reason,
        tokens=writer.tokens,
        duration_ms=end.duration_ms,
        tokens_per_s=writer.tokens / duration if duration > 0 else None,
    )
    return {"finish_reason": end.finish_reason, "tokens": writer.tokens, "usage": usage}


def _stream(
    llm: Any, request: GenerationRequest, writer: StreamWriter, max_tokens: int, started: float
) -> StreamedAnswer:
    """Stream the model's answer through the publisher; how it ended."""
    publisher = TokenPublisher(writer, limit=max_tokens, started=started)
    messages = [_MESSAGE_TYPES[m.role](content=m.content) for m in request.messages]
    answer = StreamedAnswer()
    with closing(stream_chat(llm, messages, [publisher], answer)) as deltas:
        for _ in deltas:
            if publisher.over_limit:  # the server ignored the limit; stop it here
                answer.finish_reason = "length"
                break
    writer.flush()
    if answer.finish_reason is None:
        raise TruncatedStreamError("the model's stream ended without a finish reason")
    return answer
