"""The event stream endpoint: a job's entries as server-sent events, resumable, shared."""

from __future__ import annotations

import re
from typing import Any

from rq.job import Job
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.errors import JobNotFoundError, StreamTimeoutError
from tokenrelay.gateway.access import needs_reader
from tokenrelay.gateway.jobs import not_found, unavailable
from tokenrelay.gateway.responses import COMMON_HEADERS, error
from tokenrelay.gateway.sse import EventStream, event
from tokenrelay.gateway.state import Gateway, client_address, gateway_of
from tokenrelay.outage import UNAVAILABLE
from tokenrelay.stream import keys
from tokenrelay.stream.follower import follow, opening
from tokenrelay.stream.keys import JOB_ID_PATTERN, StateField
from tokenrelay.stream.protocol import text
from tokenrelay.stream.reader import BEGINNING, id_order, is_capped

#: A stream entry id, as `Last-Event-ID` and `?after=` carry it (ASCII digits only).
ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")

#: The largest part of an entry id Redis accepts (an unsigned 64-bit number).
_ID_PART_MAX = 2**64 - 1

#: What keeps a stream from opening: Redis away (503).
_CANNOT_OPEN: tuple[type[Exception], ...] = (*UNAVAILABLE, StreamTimeoutError)

#: Seconds the checks before a stream opens may take.
OPEN_TIMEOUT = 10.0


def _cursor(request: Request) -> str | None:
    """Where the client resumes: Last-Event-ID (a reconnect), else ?after=, else the start."""
    after = request.headers.get("last-event-id") or request.query_params.get("after") or BEGINNING
    parts = ENTRY_ID.fullmatch(after)
    if parts is None or any(int(part) > _ID_PART_MAX for part in parts.groups()):
        return None
    return after


async def _trimmed(gateway: Gateway, job_id: str, start: str) -> bytes:
    """A `trimmed` event if the cursor is older than the oldest entry a capped stream holds."""
    if start == BEGINNING:
        return b""
    client = gateway.client
    maxlen = await client.hget(keys.stream_state(job_id), StateField.MAXLEN.value)
    if not is_capped(maxlen):
        return b""
    oldest: Any = await client.xrange(keys.token_stream(job_id), count=1)
    if not oldest or id_order(text(oldest[0][0])) <= id_order(start):
        return b""
    first = text(oldest[0][0])
    message = (
        f"entries after {start} were trimmed from the stream (its length cap) before this "
        f"reader got them; it goes on from {first}"
    )
    return event("trimmed", {"after": start, "oldest": first, "message": message})


async def events(request: Request) -> Response | EventStream:
    """GET /v1/jobs/{job_id}/events: the job's entries as server-sent events.

    `Last-Event-ID` (or `?after=ID`) resumes after an entry; `?live=1` starts at the newest.
    A stream already ended at the cursor answers 204 (EventSource stops reconnecting).
    """
    if request.method == "HEAD":  # it would hold a stream open with nowhere to send it
        return error(
            405, "method_not_allowed", "an event stream is read with GET", {"Allow": "GET"}
        )
    job_id = request.path_params["job_id"]
    refused = needs_reader(request, job_id)
    if refused is not None:
        return refused
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return not_found(job_id)
    after = _cursor(request)
    if after is None:
        return error(400, "bad_request", "Last-Event-ID and ?after= must be stream entry ids")
    # `live` begins at the newest entry, once: a reconnect (Last-Event-ID) goes on from its id.
    reconnect = "last-event-id" in request.headers
    live = request.query_params.get("live") in ("1", "true") and after == BEGINNING
    live = live and not reconnect
    gateway = gateway_of(request)
    address = client_address(request)
    if not gateway.streams.acquire(address):
        limit = gateway.settings.gateway_streams_per_client
        message = f"{limit} event streams are open from this address already (the limit)"
        return error(429, "too_many_streams", message, {"Retry-After": "5"})
    try:
        alive = [Job.key_for(job_id)]
        start = await opening(
            gateway.hub, job_id, after=after, live=live, alive_keys=alive, timeout=OPEN_TIMEOUT
        )
        prelude = b"" if start is None else await _trimmed(gateway, job_id, start)
        if live and start is not None:  # where `live` began: a reconnect goes on from there
            prelude = f"id: {start}\n\n".encode() + prelude
    except JobNotFoundError:
        gateway.streams.release(address)
        return not_found(job_id)
    except _CANNOT_OPEN as exc:
        gateway.streams.release(address)
        return unavailable(exc)
    except BaseException:  # a damaged stream, a cancelled request: the slot is given back
        gateway.streams.release(address)
        raise
    if start is None:
        gateway.streams.release(address)
        return Response(status_code=204, headers=COMMON_HEADERS)
    batches = follow(
        gateway.hub,
        job_id,
        after=start,
        alive_keys=alive,
        heartbeat=gateway.settings.gateway_ping_interval,
        resume_on_lag=False,
        opened=True,
    )
    return EventStream(
        keys.token_stream(job_id),
        batches,
        frames=gateway.frames,
        send_timeout=gateway.settings.gateway_send_timeout,
        stopping=gateway.stopping,
        prelude=prelude,
        after=start,
        on_close=lambda: gateway.streams.release(address),
    )
