"""Idempotency keys: one job per key, however often and from however many processes it is sent.

`submit(..., idempotency_key=K)` queues a job only if no record of K exists; otherwise it
returns the recorded job, whether that job is queued, running or over. The record
(`tokenrelay:idempotency:K`, a hash of `IdempotencyField`) holds the job id and the request's
fingerprint, so the same key sent with a different request is refused rather than answered
with another request's job. `Relay` reads the records and writes a new one in the
transaction that queues its job (WATCH/MULTI), so concurrent submitters of one key get one
job.

A record expires TOKENRELAY_IDEMPOTENCY_WINDOW seconds after the first submission; the same
key afterwards queues a new job. The job itself is kept on a separate clock: its stream and
RQ's result expire TOKENRELAY_STREAM_TTL seconds after its last write. Both default to a day,
so within the window the job can always be read; with a window longer than the stream TTL,
a key may return a job that has expired (its handle raises JobNotFoundError).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from redis import Redis
from redis.client import Pipeline

from tokenrelay.errors import InvalidRequestError
from tokenrelay.producer.request import GenerationRequest, shown
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import text


class IdempotencyField(StrEnum):
    """The fields of an idempotency record."""

    JOB_ID = "job_id"  # the job the key's first submission queued
    REQUEST = "request"  # that request's fingerprint (`GenerationRequest.fingerprint`)


@dataclass(frozen=True)
class Recorded:
    """What an idempotency key was first used for."""

    job_id: str
    fingerprint: str | None


# KEYS: idempotency records. For each, its job id and fingerprint (nil where absent).
_LOOKUP = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HMGET', KEYS[i], ARGV[1], ARGV[2])
end
return out
"""


def lookup(client: Redis, idempotency_keys: Sequence[str]) -> list[Recorded | None]:
    """The records of the given idempotency keys, in one round trip, on the given connection
    (inside a transaction: the pipeline that WATCHes them)."""
    names = [keys.idempotency(k) for k in idempotency_keys]
    found = client.eval(_LOOKUP, len(names), *names, *IdempotencyField)
    out: list[Recorded | None] = []
    for job_id, fingerprint in found:
        if job_id is None:
            out.append(None)
        else:
            out.append(Recorded(text(job_id), None if fingerprint is None else text(fingerprint)))
    return out


def remember(
    pipe: Pipeline, key: str, job_id: str, request: GenerationRequest, window: int
) -> None:
    """Add the writing of a new record to a transaction (a pipeline after MULTI)."""
    name = keys.idempotency(key)
    fields = {IdempotencyField.JOB_ID: job_id, IdempotencyField.REQUEST: request.fingerprint()}
    pipe.hset(name, mapping=fields)  # type: ignore[arg-type]  # redis-py wants a dict of str
    pipe.expire(name, window)


def recorded_job(key: str, request: GenerationRequest, found: Recorded) -> str:
    """The recorded job, if `request` is the one its key was first used for; otherwise
    InvalidRequestError (the same key for another request, or for another job id)."""
    if found.fingerprint != request.fingerprint():
        raise InvalidRequestError(
            f"idempotency key {shown(key)} was already used for a different request"
        )
    if request.job_id is not None and request.job_id != found.job_id:
        raise InvalidRequestError(
            f"idempotency key {shown(key)} was already used for job {shown(found.job_id)}, "
            f"not {shown(request.job_id)}"
        )
    return found.job_id


def deduplicated(
    requests: Sequence[GenerationRequest],
) -> tuple[list[GenerationRequest], list[int]]:
    """The batch with one job per idempotency key: each request's leader, the first request
    with its key (itself if it has none), and the requests, leaders carrying their group's
    job id if any member names one.

    Raises InvalidRequestError, naming both items, if two requests share a key but not what
    they ask for, or name different job ids.
    """
    first: dict[str, int] = {}
    leaders = list(range(len(requests)))
    merged = list(requests)
    for i, request in enumerate(requests):
        key = request.idempotency_key
        if key is None:
            continue
        leader = first.setdefault(key, i)
        if leader == i:
            continue
        leaders[i] = leader
        chosen = merged[leader]
        if request.fingerprint() != chosen.fingerprint():
            raise InvalidRequestError(
                f"items {leader} and {i} use idempotency key {shown(key)} for different requests"
            )
        if request.job_id is not None and chosen.job_id not in (None, request.job_id):
            raise InvalidRequestError(
                f"items {leader} and {i} use idempotency key {shown(key)} with different job ids"
            )
        if request.job_id is not None:
            merged[leader] = replace(chosen, job_id=request.job_id)
    return merged, leaders
