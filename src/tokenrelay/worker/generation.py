"""One generation, from `start` entry to `end` or `error` entry, as a task of the worker's loop.

It gets everything it uses passed in (`JobRun`): the RQ job, the settings, the process's
stream batcher and model clients, and, for a job taken over from a dead worker, the claim it
goes on from (the text so far, read back from its stream). It writes the `start` entry (or,
taken over, an `attempt` entry), runs attempts until one ends well (`worker.retrying`), and
writes the `end` entry, whose usage covers every attempt.

It writes its stream's terminal entry on every path: the end, a model error, and a stop
decided by the worker (a timeout, a stop command, a cancel, a shutdown), which sets
`JobRun.stop` before cancelling the task.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from tokenrelay.errors import (
    GenerationError,
    InvalidRequestError,
    RedisUnavailableError,
    StreamClosedError,
    WorkerLostError,
    WriterFencedError,
)
from tokenrelay.producer.request import GenerationRequest, request_from_payload
from tokenrelay.stream.batched import BatchedStream
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    ErrorEntry,
    Policy,
    StartEntry,
)
from tokenrelay.worker.failures import error_entry
from tokenrelay.worker.resume import read_text
from tokenrelay.worker.retrying import run_attempts
from tokenrelay.worker.run import JobRun, Usage
from tokenrelay.worker.streaming import StreamedAnswer

log = structlog.get_logger()

#: The reason an attempt entry gives when the worker before died.
WORKER_LOST = "WorkerLost"


async def generate(run: JobRun) -> dict[str, Any]:
    """Run the job's generation; what RQ stores as its result."""
    job, settings = run.job, run.settings
    try:
        request, ttl = request_from_payload(job.args[0] if job.args else None, job.id, settings)
    except InvalidRequestError as exc:
        await _refuse(run, exc)
        raise
    stream = run.batcher.stream(
        job.id,
        ttl=ttl,
        events_cap=settings.events_max_len,
        maxlen=settings.stream_maxlen,
        claim=run.claim,
    )
    run.stream = stream
    model = request.model or settings.model
    max_tokens = request.max_tokens or settings.max_tokens
    started = time.time()
    submitted = job.enqueued_at.timestamp() if job.enqueued_at else None
    queue_wait_ms = None if submitted is None else (started - submitted) * 1000
    usage = Usage()
    try:
        if run.claim is None:
            await _begin(run, request, stream, model, max_tokens, started, submitted)
            so_far = ""
        else:
            started, so_far = await _take_over(run, stream, usage)
        answer = await run_attempts(run, request, stream, max_tokens, started, so_far, usage)
    except (StreamClosedError, WriterFencedError) as exc:
        log.info("job.stream_closed", tokens=stream.tokens, reason=str(exc))
        raise
    except asyncio.CancelledError:
        await _end_stopped(run, stream, model)
        raise
    except RedisUnavailableError:
        # Past the outage limit nothing can be written; the job's lease lapses, and a
        # worker takes it over once Redis is back.
        log.error("job.abandoned_to_outage", tokens=stream.tokens)
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
    return await _finish(run, stream, answer, usage, model, started, queue_wait_ms)


async def _begin(
    run: JobRun,
    request: GenerationRequest,
    stream: BatchedStream,
    model: str,
    max_tokens: int,
    started: float,
    submitted: float | None,
) -> None:
    """Write the `start` entry, which makes this run the stream's writer and gives it a lease."""
    job = run.job
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
    try:
        lease_ms = int(run.settings.lease_ttl * 1000)
        await stream.begin(start, queue=job.origin, lease_ms=lease_ms)
    except WriterFencedError:
        log.error("job.duplicate", reason="another worker is writing this job's stream")
        raise
    log.info(
        "job.started",
        model=model,
        prompt_chars=request.prompt_chars,
        queue_wait_ms=None if submitted is None else (started - submitted) * 1000,
    )


async def _take_over(run: JobRun, stream: BatchedStream, usage: Usage) -> tuple[float, str]:
    """Go on with a dead worker's job: when it started, and the text to continue from."""
    claim = run.claim
    assert claim is not None
    run.begin_attempt(claim.attempt)
    usage.completion = claim.streamed
    stream.seed(await read_text(run.batcher.client, run.job.id, run.batcher.outage))
    started = claim.started_at or time.time()
    log.info("job.resumed", attempt=claim.attempt, from_seq=claim.next_seq)
    if claim.attempt > run.settings.max_attempts:
        raise WorkerLostError(
            f"the worker running the job stopped answering, and no attempt is left: "
            f"{claim.attempt - 1} of TOKENRELAY_MAX_ATTEMPTS={run.settings.max_attempts} were made"
        )
    policy = Policy(run.settings.retry_policy)
    from_seq = claim.next_seq if policy == Policy.CONTINUE else 0
    await stream.new_attempt(AttemptEntry(claim.attempt, WORKER_LOST, policy, from_seq))
    return started, stream.text if policy == Policy.CONTINUE else ""


async def _refuse(run: JobRun, exc: InvalidRequestError) -> None:
    """End the stream of a job whose payload fails the checks `submit` makes."""
    job, settings = run.job, run.settings
    entry = ErrorEntry("InvalidRequestError", str(exc), retryable=False, attempt=run.attempt)
    stream = run.batcher.stream(
        job.id, ttl=settings.stream_ttl, events_cap=settings.events_max_len, claim=run.claim
    )
    if await stream.close(entry, queue=job.origin, model=None, nonce=run.nonce):
        log.warning("job.refused", reason=str(exc))


async def _end_stopped(run: JobRun, stream: BatchedStream, model: str) -> None:
    """The worker stopped the job: end its stream with the reason the worker gave."""
    entry = run.stop or ErrorEntry(
        "WorkerShutdown", "the worker stopped while running the job", True, run.attempt
    )
    ended = stream.close(entry, queue=run.job.origin, model=model, nonce=run.nonce)
    try:
        if await asyncio.shield(ended):
            log.warning("job.stopped", error_type=entry.error_type, tokens=stream.tokens)
    except (StreamClosedError, WriterFencedError, RedisUnavailableError):
        pass  # ended already, or never this attempt's, or unreachable: nothing to end


async def _finish(
    run: JobRun,
    stream: BatchedStream,
    answer: StreamedAnswer,
    usage: Usage,
    model: str,
    started: float,
    queue_wait_ms: float | None,
) -> dict[str, Any]:
    """Write the `end` entry: usage over every attempt, and timings."""
    ended = time.time()
    assert answer.finish_reason is not None  # _attempt raised otherwise
    first = stream.first_token_at
    prompt = usage.prompt if usage.reported else None
    end = EndEntry(
        finish_reason=answer.finish_reason,
        tokens=stream.tokens,
        prompt_tokens=prompt,
        completion_tokens=usage.completion if usage.reported else None,
        total_tokens=None if prompt is None else prompt + usage.completion,
        queue_wait_ms=queue_wait_ms,
        ttft_ms=None if first is None else (first - started) * 1000,
        duration_ms=(ended - started) * 1000,
        attempts=run.attempt,
    )
    closing = stream.close(end, queue=run.job.origin, model=model, nonce=run.nonce)
    if not await asyncio.shield(closing):
        raise StreamClosedError(f"job {run.job.id} was ended elsewhere before it finished")
    duration = ended - started
    log.info(
        "job.finished",
        finish_reason=end.finish_reason,
        tokens=stream.tokens,
        attempts=run.attempt,
        duration_ms=end.duration_ms,
        tokens_per_s=stream.tokens / duration if duration > 0 else None,
    )
    result_usage = {
        "input_tokens": end.prompt_tokens,
        "output_tokens": end.completion_tokens,
        "total_tokens": end.total_tokens,
    }
    return {"finish_reason": end.finish_reason, "tokens": stream.tokens, "usage": result_usage}
