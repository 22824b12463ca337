"""The producer: `Relay` submits generation jobs to the RQ queue, one at a time or in batches."""

from __future__ import annotations

import json
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
from tokenrelay.producer import idempotency
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
        timeout: float | None = None,
        first_token_timeout: float | None = None,
        stall_timeout: float | None = None,
        attempt_timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> JobHandle:
        """Queue one generation; raises InvalidRequestError, with nothing queued, on bad input.

        `timeout` bounds the whole job, over every attempt (default TOKENRELAY_JOB_TIMEOUT);
        `first_token_timeout` and `stall_timeout` bound an attempt's wait for its first token
        and between tokens, and `attempt_timeout` the whole of one attempt (defaults from the
        worker's settings): past them the attempt ends and is retried.

        With an `idempotency_key` (1 to 200 printable ASCII characters, no spaces), every
        submit of that key within TOKENRELAY_IDEMPOTENCY_WINDOW seconds of the first returns
        the first one's job, queued, running or over, from any process: only one job is
        queued. The same key with a different request (or another `job_id`) is refused. The
        window counts from the first submit; the job's stream and result are kept
        TOKENRELAY_STREAM_TTL seconds after its last write, so with a window longer than
        that a late submit may return a job that has expired (JobNotFoundError when read).
        """
        request = build_request(
            prompt,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            job_id=job_id,
            metadata=metadata,
            timeout=timeout,
            first_token_timeout=first_token_timeout,
            stall_timeout=stall_timeout,
            attempt_timeout=attempt_timeout,
            idempotency_key=idempotency_key,
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
        """Queue a batch, `chunk_size` items per atomic step (one round trip each).

        Each item is a prompt or a mapping of `submit`'s keyword arguments. Every item is
        checked before any is queued, and every job id it names must be free; `progress`
        is told how many items are done. A job id is reserved in the same atomic step that
        queues its job, so two submitters of one id never both succeed; if another takes an
        id of a later chunk meanwhile, BatchInterruptedError carries the jobs already queued.

        Items with one `idempotency_key` are one job (they must ask for the same thing), and
        a key used before returns its recorded job, as in `submit`: their handles repeat.
        """
        checked = [self._checked(i, item) for i, item in enumerate(items)]
        requests, leaders = idempotency.deduplicated(checked)
        ids = [r.job_id or uuid.uuid4().hex for r in requests]
        jobs = [i for i, leader in enumerate(leaders) if leader == i]
        if len({ids[i] for i in jobs}) != len(jobs):
            raise InvalidRequestError("the batch uses a job id more than once")
        with redis_errors(self.settings.effective_redis_url):
            known = self._recorded(self.redis, {i: requests[i] for i in jobs})
            self._refuse_taken(self.redis, [ids[i] for i in jobs if i not in known])
            for start in range(0, len(requests), chunk_size):
                end = min(start + chunk_size, len(requests))
                todo = [i for i in jobs if start <= i < end and i not in known]
                try:
                    raced = self._enqueue([requests[i] for i in todo], [ids[i] for i in todo])
                except InvalidRequestError as exc:
                    if not start:
                        raise
                    queued = [
                        self.job(known.get(leaders[i], ids[leaders[i]])) for i in range(start)
                    ]
                    done = f"; the first {start:,} items of the batch were queued"
                    raise BatchInterruptedError(f"{exc}{done}", queued) from None
                known.update({todo[j]: job_id for j, job_id in raced.items()})
                if progress is not None:
                    progress(end)
        return [self.job(known.get(leader, ids[leader])) for leader in leaders]

    def _checked(self, index: int, item: BatchItem) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item
        kwargs = {"prompt": item} if isinstance(item, str) else dict(item)
        try:
            return build_request(**kwargs, settings=self.settings)
        except (InvalidRequestError, TypeError) as exc:
            raise InvalidRequestError(f"item {index}: {exc}") from None

    def _recorded(self, client: Redis, requests: Mapping[int, GenerationRequest]) -> dict[int, str]:
        """The requests (by position) whose idempotency key is recorded: the recorded job ids.

        One round trip, on the given connection, if any request has a key; InvalidRequestError
        if a key was used for another request.
        """
        keyed = {i: r.idempotency_key for i, r in requests.items() if r.idempotency_key}
        if not keyed:
            return {}
        found = idempotency.lookup(client, list(keyed.values()))
        return {
            i: idempotency.recorded_job(key, requests[i], record)
            for (i, key), record in zip(keyed.items(), found, strict=True)
            if record is not None
        }

    def _enqueue(self, requests: Sequence[GenerationRequest], ids: Sequence[str]) -> dict[int, str]:
        """Queue checked requests in one transaction, with a `submitted` lifecycle entry each
        and the record of each idempotency key.

        The transaction WATCHes every key of the jobs' ids and their idempotency records: if
        another submitter takes one between the check and the commit, nothing is queued and
        the check runs again. The requests whose key another submitter recorded meanwhile
        are not queued: returned (by position) with the recorded job ids. Each job carries
        this call's nonce in its RQ metadata, so that a commit whose reply was lost (redis-py
        reports it as a changed key) is recognised as this call's own, not another's.
        """
        if not requests:
            return {}
        nonce = uuid.uuid4().hex
        with self.redis.pipeline() as pipe:
            while True:
                watched = [key for job_id in ids for key in _id_keys(job_id)]
                watched += [
                    keys.idempotency(r.idempotency_key) for r in requests if r.idempotency_key
                ]
                pipe.watch(*watched)  # type: ignore[no-untyped-call]  # unannotated in redis-py
                try:
                    raced = self._recorded(pipe, dict(enumerate(requests)))
                    fresh = [i for i in range(len(requests)) if i not in raced]
                    self._refuse_taken(pipe, [ids[i] for i in fresh])
                except InvalidRequestError:
                    pipe.reset()
                    raise
                if not fresh:
                    pipe.reset()
                    return raced
                pipe.multi()
                self.queue.enqueue_many(
                    [self._job_data(requests[i], ids[i], nonce) for i in fresh], pipeline=pipe
                )
                now = time.time()
                for i in fresh:
                    request = requests[i]
                    if request.idempotency_key:
                        window = self.settings.idempotency_window
                        idempotency.remember(pipe, request.idempotency_key, ids[i], request, window)
                    event = LifecycleEvent(
                        Event.SUBMITTED, ids[i], now, self.settings.queue, request.model
                    )
                    emit(pipe, event, cap=self.settings.events_max_len)
                try:
                    pipe.execute()
                    return raced
                except WatchError:
                    if self._committed(ids[fresh[0]], nonce):  # only the reply was lost
                        return raced
                    continue  # a watched id or key changed hands: check again

    def _committed(self, job_id: str, nonce: str) -> bool:
        """Whether the job under `job_id` was queued by the call with `nonce` (the transaction
        queues all its jobs or none, so one tells for all)."""
        raw = self.redis.hget(Queue.job_class.key_for(job_id), "meta")
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            return False
        return isinstance(meta, dict) and meta.get(keys.SUBMIT_NONCE) == nonce

    @staticmethod
    def _refuse_taken(client: Redis, ids: Sequence[str]) -> None:
        """InvalidRequestError naming the first id that a job (or its stream) already uses.

        One round trip, on the given connection (a pipeline that WATCHes the same keys).
        """
        if not ids:
            return
        found = client.eval(_FIRST_TAKEN, 3 * len(ids), *(k for i in ids for k in _id_keys(i)))
        if not found:
            return
        taken = ids[int(found) - 1]
        shown = taken if len(taken) <= 40 else f"{taken[:37]}..."
        raise InvalidRequestError(f"job id {shown!r} is already in use")

    def _job_data(self, request: GenerationRequest, job_id: str, nonce: str) -> EnqueueData:
        payload = {**request.to_payload(), STREAM_TTL_FIELD: self.settings.stream_ttl}
        return Queue.prepare_data(
            keys.GENERATE_FUNC,
            args=(payload,),
            job_id=job_id,
            timeout=request.timeout or self.settings.job_timeout,
            result_ttl=self.settings.stream_ttl,
            failure_ttl=self.settings.stream_ttl,
            # RQ's default description repeats the arguments, prompt and all, into its logs.
            description=f"generation of {request.prompt_chars} prompt characters",
            on_failure=Callback(keys.ON_FAILURE_CALLBACK),
            on_stopped=Callback(keys.ON_STOPPED_CALLBACK),
            meta={keys.SUBMIT_NONCE: nonce},
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
