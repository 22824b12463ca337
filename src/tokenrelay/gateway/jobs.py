"""The job endpoints: submit, status and result, cancel; and the operator's status."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.connection import redis_errors
from tokenrelay.errors import (
    InvalidRequestError,
    JobFailedError,
    JobNotFoundError,
    RedisUnavailableError,
    TokenRelayError,
)
from tokenrelay.gateway.access import needs_key, needs_reader
from tokenrelay.gateway.limits import BodyError, read_json
from tokenrelay.gateway.responses import error, json_response
from tokenrelay.gateway.state import Gateway, gateway_of
from tokenrelay.outage import UNAVAILABLE
from tokenrelay.producer.handle import JobHandle, JobState
from tokenrelay.producer.relay import Relay
from tokenrelay.producer.request import SUBMIT_FIELDS
from tokenrelay.status import collect_status
from tokenrelay.stream.keys import JOB_ID_PATTERN

log = structlog.get_logger()


def not_found(job_id: str) -> Response:
    """The 404 of a job that does not exist (or has expired)."""
    shown = job_id if len(job_id) <= 40 else f"{job_id[:37]}..."
    return error(404, "not_found", f"no job {shown!r} (it may have expired)")


def unavailable(exc: Exception) -> Response:
    """The 503 of a Redis that cannot be reached: what happened is logged, where Redis is
    (its address, in the error's text) is not told to the client."""
    log.warning("gateway.redis_unavailable", error_type=type(exc).__name__, error=str(exc))
    message = "the gateway cannot reach its Redis just now; try again shortly"
    return error(503, "unavailable", message, {"Retry-After": "5"})


def links(gateway: Gateway, job_id: str) -> dict[str, Any]:
    """A new read token for the job, and the links that carry it."""
    token, expires = gateway.tokens.mint(job_id)
    return {
        "job_id": job_id,
        "read_token": token,
        "expires_at": expires,
        "watch_url": f"/watch/{job_id}#token={token}",
        "events_url": f"/v1/jobs/{job_id}/events?token={token}",
    }


async def submit(request: Request) -> Response:
    """POST /v1/jobs: queue a generation, with `submit`'s checks and messages."""
    refused = needs_key(request)
    if refused is not None:
        return refused
    gateway = gateway_of(request)
    try:
        body = await read_json(request, gateway.settings.gateway_max_body)
    except BodyError as exc:
        return error(exc.status, exc.kind, str(exc))
    unknown = sorted(set(body) - SUBMIT_FIELDS)
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        return error(400, "invalid_request", f"unknown fields: {shown}")
    try:
        handle = await asyncio.to_thread(gateway.relay.submit, **body)
    except InvalidRequestError as exc:
        return error(400, "invalid_request", str(exc))
    except RedisUnavailableError as exc:
        return unavailable(exc)
    return json_response(links(gateway, handle.job_id), 201)


#: Seconds an ended job's stream may take to give its outcome: it holds its terminal entry
#: already, unless the stream is gone or was never written (RQ's record outlives it).
_OUTCOME_TIMEOUT = 10.0


def _outcome(relay: Relay, handle: JobHandle, state: JobState) -> dict[str, Any]:
    """What a job's stream says of its end: the text and `end`, or the error (blocking)."""
    if state not in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED):
        return {}
    with redis_errors(relay.settings.effective_redis_url):
        exists = relay.redis.exists(handle.stream_key)
    if not exists:  # RQ's record of the job outlived its stream
        message = f"the stream of job {handle.job_id!r} has expired or was deleted"
        return {"unreadable": {"error_type": "StreamExpiredError", "message": message}}
    try:
        result = handle.result(timeout=_OUTCOME_TIMEOUT)
    except JobFailedError as exc:
        return {"error": asdict(exc.error)}
    except RedisUnavailableError:
        raise
    except TokenRelayError as exc:  # a gap, a stream expired, damaged or never written
        return {"unreadable": {"error_type": type(exc).__name__, "message": str(exc)}}
    return {"text": result.text, "end": asdict(result.end)}


def _status(relay: Relay, job_id: str) -> dict[str, Any]:
    handle = relay.job(job_id)
    state = handle.status()
    return {"job_id": job_id, "state": state.value, **_outcome(relay, handle, state)}


async def job_status(request: Request) -> Response:
    """GET /v1/jobs/{job_id}: the job's state, and its text or error once it has ended."""
    job_id = request.path_params["job_id"]
    refused = needs_reader(request, job_id)
    if refused is not None:
        return refused
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return not_found(job_id)
    relay = gateway_of(request).relay
    try:
        return json_response(await asyncio.to_thread(_status, relay, job_id))
    except JobNotFoundError:
        return not_found(job_id)
    except RedisUnavailableError as exc:
        return unavailable(exc)


def _cancel(handle: JobHandle) -> bool:
    handle.status()  # JobNotFoundError for an unknown job
    return handle.cancel()


async def cancel(request: Request) -> Response:
    """POST /v1/jobs/{job_id}/cancel: end the job with a `cancelled` error (an API key's)."""
    refused = needs_key(request)
    if refused is not None:
        return refused
    job_id = request.path_params["job_id"]
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return not_found(job_id)
    handle = gateway_of(request).relay.job(job_id)
    try:
        cancelled = await asyncio.to_thread(_cancel, handle)
    except JobNotFoundError:
        return not_found(job_id)
    except RedisUnavailableError as exc:
        return unavailable(exc)
    return json_response({"job_id": job_id, "cancelled": cancelled})


async def ops_status(request: Request) -> Response:
    """GET /v1/status: what `tokenrelay status --json` shows (an API key's)."""
    refused = needs_key(request)
    if refused is not None:
        return refused
    gateway = gateway_of(request)
    queues = request.query_params.getlist("queue") or [gateway.settings.queue]
    try:
        status = await asyncio.to_thread(collect_status, gateway.relay.redis, queues)
    except UNAVAILABLE as exc:
        return unavailable(exc)
    return json_response(status.as_dict())
