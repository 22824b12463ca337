"""The producer: `Relay` submits generation jobs to the RQ queue, one at a time or in batches."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from redis import Redis
from rq import Callback, Queue
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from tokenrelay import keys
from tokenrelay.connection import connect, redis_errors
from tokenrelay.errors import InvalidRequestError
from tokenrelay.handle import JobHandle
from tokenrelay.protocol import Event, LifecycleEvent
from tokenrelay.request import GenerationRequest, build_request
from tokenrelay.settings import Settings
from tokenrelay.writer import emit

#: One request in a batch: a prompt, the keyword arguments of `Relay.submit`, or a checked request.
BatchItem = str | Mapping[str, Any] | GenerationRequest


class Relay:
    """Submits generation jobs and hands out `JobHandle`s to follow them.

    Takes an explicit Redis client (created with `decode_responses=False`, as RQ
    needs); `Relay.from_env()` builds one from the environment.
    """

    def __init__(self, redis: Redis, settings: Settings | None = None) -> None:
        self.redis = redis
        self.settings = settings or Settings()
        self.queue = Queue(self.settings.queue, connection=redis, serializer=JSONSerializer)

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Relay:
        """A relay connected to the configured Redis; raises RedisUnavailableError if down."""
        settings = settings or Settings.from_env()
        return cls(connect(settings.effective_redis_url), settings)

    def close(self) -> None:
        """Release the Redis connections."""
        self.redis.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job, by id."""
        return JobHandle(self.redis, job_id, settings=self.settings)

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        job_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> JobHandle:
        """Queue one generation; raises InvalidRequestError, with nothing queued, on bad input."""
        request = build_request(
            prompt,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            job_id=job_id,
            metadata=metadata,
            settings=self.settings,
        )
        return self.submit_many([request])[0]

    def submit_many(
        self,
        items: Iterable[BatchItem],
        *,
        chunk_size: int = 500,
        progress: Callable[[int], None] | None = None,
    ) -> list[JobHandle]:
        """Queue a batch, pipelined `chunk_size` jobs per round trip.

        Each item is a prompt or a mapping of `submit`'s keyword arguments. Every
        item is checked before any is queued; `progress` is told how many are queued.
        """
        requests = [self._checked(i, item) for i, item in enumerate(items)]
        ids = [r.job_id or uuid.uuid4().hex for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("the batch uses a job id more than once")
        with redis_errors(self.settings.effective_redis_url):
            self._refuse_existing(ids)
            for start in range(0, len(requests), chunk_size):
                end = start + chunk_size
                self._enqueue(requests[start:end], ids[start:end])
                if progress is not None:
                    progress(min(end, len(requests)))
        return [self.job(job_id) for job_id in ids]

    def _checked(self, index: int, item: BatchItem) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item
        kwargs = {"prompt": item} if isinstance(item, str) else dict(item)
        try:
            return build_request(**kwargs, settings=self.settings)
        except (InvalidRequestError, TypeError) as exc:
            raise InvalidRequestError(f"item {index}: {exc}") from None

    def _enqueue(self, requests: Sequence[GenerationRequest], ids: Sequence[str]) -> None:
        """Queue checked requests in one pipeline, with a `submitted` lifecycle entry each."""
        with self.redis.pipeline() as pipe:
            self.queue.enqueue_many(
                [self._job_data(r, job_id) for r, job_id in zip(requests, ids, strict=True)],
                pipeline=pipe,
            )
            now = time.time()
            for request, job_id in zip(requests, ids, strict=True):
                emit(
                    pipe,
                    LifecycleEvent(
                        Event.SUBMITTED, job_id, now, self.settings.queue, request.model
                    ),
                )
            pipe.execute()

    def _refuse_existing(self, ids: Sequence[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(Queue.job_class.key_for(job_id), keys.token_stream(job_id))
            taken = [job_id for job_id, n in zip(ids, pipe.execute(), strict=True) if n]
        if taken:
            raise InvalidRequestError(f"job id {taken[0]!r} is already in use")

    def _job_data(self, request: GenerationRequest, job_id: str) -> EnqueueData:
        payload = {**request.to_payload(), "stream_ttl": self.settings.stream_ttl}
        return Queue.prepare_data(
            keys.GENERATE_FUNC,
            args=(payload,),
            job_id=job_id,
            timeout=self.settings.job_timeout,
            result_ttl=self.settings.stream_ttl,
            failure_ttl=self.settings.stream_ttl,
            # RQ's default description repeats the arguments, prompt and all, into its logs.
            description=f"generation of {request.prompt_chars} prompt characters",
            on_failure=Callback(keys.ON_FAILURE_CALLBACK),
            on_stopped=Callback(keys.ON_STOPPED_CALLBACK),
        )


def submit(prompt: str | None = None, *, relay: Relay | None = None, **options: Any) -> JobHandle:
    """Queue one generation with a relay built from the environment (or the one given).

    Without `relay`, each call opens a new connection; a script that submits many jobs
    should hold one `Relay` (or use `submit_many`).
    """
    return (relay or Relay.from_env()).submit(prompt, **options)


def submit_many(items: Iterable[BatchItem], *, relay: Relay | None = None) -> list[JobHandle]:
    """Queue a batch with a relay built from the environment (or the one given)."""
    return (relay or Relay.from_env()).submit_many(items)
