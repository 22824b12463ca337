"""The producer: `Relay` submits generation jobs to the RQ queue, one at a time or in batches."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import WatchError
from rq import Callback, Queue
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from tokenrelay.connection import client_for, redis_errors
from tokenrelay.errors import BatchInterruptedError, InvalidRequestError
from tokenrelay.producer.handle import JobHandle
from tokenrelay.producer.request import STREAM_TTL_FIELD, GenerationRequest, build_request
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import emit
from tokenrelay.stream.protocol import Event, LifecycleEvent

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
        return cls(client_for(settings), settings)

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
        """Queue a batch, `chunk_size` jobs per atomic step (one round trip each).

        Each item is a prompt or a mapping of `submit`'s keyword arguments. Every item is
        checked before any is queued, and every job id it names must be free; `progress`
        is told how many are queued. A job id is reserved in the same atomic step that
        queues its job, so two submitters of one id never both succeed; if another takes an
        id of a later chunk meanwhile, BatchInterruptedError carries the jobs already queued.
        """
        requests = [self._checked(i, item) for i, item in enumerate(items)]
        ids = [r.job_id or uuid.uuid4().hex for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("the batch uses a job id more than once")
        with redis_errors(self.settings.effective_redis_url):
            self._refuse_taken(self.redis, ids)
            for start in range(0, len(requests), chunk_size):
                end = start + chunk_size
                try:
                    self._enqueue(requests[start:end], ids[start:end], queued=start)
                except InvalidRequestError as exc:
                    if not start:
                        raise
                    queued = [self.job(job_id) for job_id in ids[:start]]
                    raise BatchInterruptedError(str(exc), queued) from None
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

    def _enqueue(
        self, requests: Sequence[GenerationRequest], ids: Sequence[str], *, queued: int
    ) -> None:
        """Queue checked requests in one transaction, with a `submitted` lifecycle entry each.

        The transaction WATCHes every key of the jobs' ids: if another submitter takes one
        between the check and the commit, nothing is queued and the check runs again.
        """
        with self.redis.pipeline() as pipe:
            while True:
                watched = [key for job_id in ids for key in _id_keys(job_id)]
                pipe.watch(*watched)  # type: ignore[no-untyped-call]  # unannotated in redis-py
                try:
                    self._refuse_taken(pipe, ids, queued=queued)
                except InvalidRequestError:
                    pipe.reset()
                    raise
                pipe.multi()
                self.queue.enqueue_many(
                    [self._job_data(r, job_id) for r, job_id in zip(requests, ids, strict=True)],
                    pipeline=pipe,
                )
                now = time.time()
                for request, job_id in zip(requests, ids, strict=True):
                    event = LifecycleEvent(
                        Event.SUBMITTED, job_id, now, self.settings.queue, request.model
                    )
                    emit(pipe, event, cap=self.settings.events_max_len)
                try:
                    pipe.execute()
                    return
                except WatchError:
                    continue  # a watched id changed hands: check again

    @staticmethod
    def _refuse_taken(client: Redis, ids: Sequence[str], *, queued: int = 0) -> None:
        """InvalidRequestError naming the first id that a job (or its stream) already uses.

        One round trip, on the given connection (a pipeline that WATCHes the same keys).
        """
        found = client.eval(_FIRST_TAKEN, 3 * len(ids), *(k for i in ids for k in _id_keys(i)))
        if not found:
            return
        taken = ids[int(found) - 1]
        shown = taken if len(taken) <= 40 else f"{taken[:37]}..."
        done = f"; the first {queued:,} jobs of the batch were queued" if queued else ""
        raise InvalidRequestError(f"job id {shown!r} is already in use{done}")

    def _job_data(self, request: GenerationRequest, job_id: str) -> EnqueueData:
        payload = {**request.to_payload(), STREAM_TTL_FIELD: self.settings.stream_ttl}
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


# KEYS: each job id's three keys (`_id_keys`), in order. The 1-based number of the first id
# with any of its keys in existence, or 0.
_FIRST_TAKEN = """
for i = 1, #KEYS, 3 do
  if redis.call('EXISTS', KEYS[i], KEYS[i + 1], KEYS[i + 2]) > 0 then return (i + 2) / 3 end
end
return 0
"""


def _id_keys(job_id: str) -> tuple[str, str, str]:
    """The keys whose existence means a job id is in use: RQ's job, its stream, its state."""
    return (Queue.job_class.key_for(job_id), keys.token_stream(job_id), keys.stream_state(job_id))


def submit(prompt: str | None = None, *, relay: Relay | None = None, **options: Any) -> JobHandle:
    """Queue one generation with a relay built from the environment (or the one given).

    Without `relay`, each call opens a new connection; a script that submits many jobs
    should hold one `Relay` (or use `submit_many`).
    """
    return (relay or Relay.from_env()).submit(prompt, **options)


def submit_many(items: Iterable[BatchItem], *, relay: Relay | None = None) -> list[JobHandle]:
    """Queue a batch with a relay built from the environment (or the one given)."""
    return (relay or Relay.from_env()).submit_many(items)
