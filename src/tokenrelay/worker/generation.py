"""One generation, from `start` entry to `end` or `error` entry, as a task of the worker's loop.

It gets everything it uses passed in (`JobRun`): the RQ job, the settings, the process's
stream batcher, model clients and Redis outage record, and, for a job taken over from a
dead worker, the claim it goes on from. It runs attempts until one succeeds or the
failures are not worth retrying (`worker.failures`) or TOKENRELAY_MAX_ATTEMPTS is spent.
Between two attempts readers see a `status: retrying` entry (with the wait), then an
`attempt` entry; with the `continue` policy the new attempt asks the model to go on from
the text so far (`worker.continuation`), with `restart` it starts over.

It writes its stream's terminal entry on every path: the end, a model error, and a stop
decided by the worker (a timeout, a stop command, a cancel, a shutdown), which sets
`JobRun.stop` before cancelling the task. The `end` entry's usage covers every attempt.
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
    RedisUnavailableError,
    StreamClosedError,
    TruncatedStreamError,
    WorkerLostError,
    WriterFencedError,
)
from tokenrelay.producer.request import GenerationRequest, request_from_payload
from tokenrelay.settings import Settings
from tokenrelay.stream.batcher import BatchedStream, StreamBatcher
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    ErrorEntry,
    Policy,
    StartEntry,
    State,
    StatusEntry,
)
from tokenrelay.stream.scripts import Claim
from tokenrelay.worker.continuation import Seam, continuation
from tokenrelay.worker.failures import error_entry, redacted, retry_delay, triage
from tokenrelay.worker.llm import ChatModels
from tokenrelay.worker.publisher import TokenPublisher
from tokenrelay.worker.resume import read_so_far
from tokenrelay.worker.streaming import StreamedAnswer, stream_chat
from tokenrelay.worker.watchdog import Watchdog

log = structlog.get_logger()

_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AIMessage,
}

#: The reason an attempt entry gives when the worker before died.
WORKER_LOST = "WorkerLost"

#: The longest `detail` of a `status` entry.
_MAX_DETAIL = 300


@dataclass
class JobRun:
    """One job as its generation runs it, with everything it needs, passed explicitly."""

    job: Job
    settings: Settings
    batcher: StreamBatcher
    models: ChatModels
    worker: str
    #: The job taken over from a dead worker: its new writer and where it stands.
    claim: Claim | None = None
    #: Why the worker stopped the job, set before it cancels the task: the error entry to end with.
    stop: ErrorEntry | None = None
    #: The job's stream, once the generation has it (the worker renews its lease).
    stream: BatchedStream | None = None
    #: The attempt running now, from 1 (`begin_attempt` moves it on).
    attempt: int = 1
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    def begin_attempt(self, attempt: int) -> None:
        """Make `attempt` the current one, for the stream and for every log line from here."""
        self.attempt = attempt
        structlog.contextvars.bind_contextvars(attempt=attempt)


@dataclass
class Usage:
    """Token usage summed over attempts; an attempt with no report counts what it streamed."""

    prompt: int = 0
    completion: int = 0
    reported: bool = False

    def add(self, answer: StreamedAnswer | None, streamed: int) -> None:
        usage = answer.usage if answer is not None else None
        if usage:
            self.reported = True
            self.prompt += int(usage.get("input_tokens", 0))
            self.completion += int(usage.get("output_tokens", streamed))
        else:
            self.completion += streamed


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
        answer = await _attempts(run, request, stream, max_tokens, started, so_far, usage)
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
    usage.prompt, usage.completion = claim.prompt_tokens, claim.completion_tokens
    so_far = await read_so_far(run.batcher.client, run.job.id, run.batcher.outage)
    started = so_far.start.started_at if so_far.start is not None else time.time()
    log.info("job.resumed", attempt=claim.attempt, from_seq=claim.next_seq)
    if claim.attempt > run.settings.max_attempts:
        raise WorkerLostError(
            f"the worker running the job stopped answering, and no attempt is left: "
            f"{claim.attempt - 1} of TOKENRELAY_MAX_ATTEMPTS={run.settings.max_attempts} were made"
        )
    policy = Policy(run.settings.retry_policy)
    from_seq = claim.next_seq if policy == Policy.CONTINUE else 0
    await stream.new_attempt(AttemptEntry(claim.attempt, WORKER_LOST, policy, from_seq))
    return started, so_far.text if policy == Policy.CONTINUE else ""


async def _attempts(
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
            if policy == Policy.CONTINUE:
                so_far = (
                    await read_so_far(run.batcher.client, run.job.id, run.batcher.outage)
                ).text
            run.begin_attempt(run.attempt + 1)
            from_seq = stream.tokens if policy == Policy.CONTINUE else 0
            await stream.new_attempt(
                AttemptEntry(run.attempt, reason, policy, from_seq),
                completion_tokens=stream.tokens - before,
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
