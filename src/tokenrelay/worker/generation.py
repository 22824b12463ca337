"""The job function: one generation, from `start` entry to `end` or `error` entry."""

from __future__ import annotations

import time
from contextlib import closing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog
from langchain_core.messages import BaseMessageChunk
from redis import Redis
from rq import get_current_job
from rq.job import Job

from tokenrelay.errors import (
    ConfigurationError,
    GenerationError,
    StreamClosedError,
    TruncatedStreamError,
)
from tokenrelay.protocol import EndEntry, StartEntry
from tokenrelay.request import GenerationRequest
from tokenrelay.settings import Settings
from tokenrelay.worker.llm import chat_model, error_entry
from tokenrelay.worker.publisher import TokenPublisher
from tokenrelay.writer import StreamWriter, close_stream

log = structlog.get_logger()

#: The running worker's settings, set by `RelayWorker` around each job.
worker_settings: ContextVar[Settings] = ContextVar("tokenrelay_worker_settings")


@dataclass(frozen=True)
class Completion:
    """How the model's stream ended."""

    finish_reason: str
    usage: dict[str, int] | None


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run the generation carried by the current RQ job; RQ stores the returned summary."""
    job = get_current_job()
    try:
        settings = worker_settings.get()
    except LookupError:
        raise ConfigurationError("tokenrelay jobs run only in `tokenrelay worker`") from None
    assert job is not None, "generate runs inside an RQ job"
    return _run(job, GenerationRequest.from_payload(payload, job.id), payload, settings)


def _run(
    job: Job, request: GenerationRequest, payload: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    client: Redis = job.connection
    model = request.model or settings.model
    max_tokens = request.max_tokens or settings.max_tokens
    attempt = (job.number_of_retries or 0) + 1
    ttl = int(payload["stream_ttl"])
    started = time.time()
    submitted = job.enqueued_at.timestamp() if job.enqueued_at else None
    writer = StreamWriter(client, job.id, ttl=ttl)
    start = StartEntry(
        job.id,
        model,
        attempt,
        submitted,
        started,
        job.worker_name or "",
        max_tokens,
        request.prompt_chars,
    )
    writer.start(start, queue=job.origin)
    queue_wait_ms = None if submitted is None else (started - submitted) * 1000
    log.info(
        "job.started", model=model, prompt_chars=request.prompt_chars, queue_wait_ms=queue_wait_ms
    )
    try:
        completion = _stream(chat_model(settings, request), request, writer, max_tokens, started)
    except StreamClosedError:
        log.info("job.cancelled", tokens=writer.tokens)
        raise
    except Exception as exc:
        entry = error_entry(exc, attempt=attempt, secret=settings.openai_api_key)
        if close_stream(client, job.id, entry, ttl=ttl, queue=job.origin, model=model):
            log.warning(
                "job.failed", error_type=entry.error_type, tokens=writer.tokens, exc_info=True
            )
        # RQ keeps the traceback of what the job raised in Redis: give it the redacted one.
        raise GenerationError(f"{entry.error_type}: {entry.message}") from None
    ended = time.time()
    usage = completion.usage or {}
    end = EndEntry(
        finish_reason=completion.finish_reason,
        tokens=writer.tokens,
        prompt_tokens=usage.get("input_tokens"),
        completion_tokens=usage.get("output_tokens"),
        total_tokens=usage.get("total_tokens"),
        queue_wait_ms=queue_wait_ms,
        ttft_ms=None if writer.first_token_at is None else (writer.first_token_at - started) * 1000,
        duration_ms=(ended - started) * 1000,
    )
    if not close_stream(client, job.id, end, ttl=ttl, queue=job.origin, model=model):
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
) -> Completion:
    """Stream the model's answer through the publisher; how it ended."""
    publisher = TokenPublisher(writer, limit=max_tokens, started=started)
    messages = [(m.role, m.content) for m in request.messages]
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    chunks = llm.stream(messages, config={"callbacks": [publisher]})
    with closing(chunks):
        for chunk in chunks:
            finish_reason = _finish_reason(chunk) or finish_reason
            usage = chunk.usage_metadata or usage
            if publisher.over_limit:  # the server ignored the limit; stop it here
                finish_reason = "length"
                break
    writer.flush()
    if finish_reason is None:
        raise TruncatedStreamError("the model's stream ended without a finish reason")
    return Completion(finish_reason, dict(usage) if usage else None)


def _finish_reason(chunk: BaseMessageChunk) -> str | None:
    reason = chunk.response_metadata.get("finish_reason")
    return str(reason) if reason else None
