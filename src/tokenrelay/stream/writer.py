"""Writing a job's stream from synchronous code: closing it (a cancel, an RQ hook), or a writer.

The worker writes through the batched async writer (`stream.batcher`); both run the scripts
of `stream.scripts`, which hold every rule of who may write what.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

from tokenrelay.stream import keys, scripts
from tokenrelay.stream.protocol import LifecycleEvent, StartEntry, Terminal, TokenEntry, ended_as

log = structlog.get_logger()


def run_script(
    client: Redis, script: scripts.Script, script_keys: list[str], args: list[str]
) -> Any:
    """Run a script by its hash, loading it on the first call after a Redis (re)start."""
    try:
        try:
            return client.evalsha(script.sha, len(script_keys), *script_keys, *args)
        except NoScriptError:
            return client.eval(script.source, len(script_keys), *script_keys, *args)
    except ResponseError as exc:
        raise scripts.refusal(str(exc)) from None


def new_writer_token() -> str:
    """A fresh writer token: one per attempt at a generation."""
    return uuid.uuid4().hex


def terminal_event(
    job_id: str, entry: Terminal, queue: str | None, model: str | None
) -> LifecycleEvent:
    """The lifecycle event that goes with a terminal entry."""
    error_type = getattr(entry, "error_type", None)
    return LifecycleEvent(ended_as(entry), job_id, time.time(), queue, model, error_type)


def close_stream(
    client: Redis,
    job_id: str,
    entry: Terminal,
    *,
    ttl: int,
    queue: str | None = None,
    model: str | None = None,
    writer: str = "",
    nonce: str | None = None,
    events_cap: int = keys.EVENTS_HARD_CAP,
) -> bool:
    """Write the stream's terminal entry unless it has one; True if this call wrote it.

    The lifecycle event is written in the same atomic step, so each job gets exactly one.
    With `writer`, only that writer may close it (WriterFencedError otherwise). A retry with
    the same `nonce` after a lost reply returns True again without writing twice.
    """
    args = scripts.close_args(
        entry,
        terminal_event(job_id, entry, queue, model),
        writer=writer,
        nonce=nonce or uuid.uuid4().hex,
        ttl=ttl,
        events_cap=events_cap,
    )
    return run_script(client, scripts.CLOSE, scripts.with_events(job_id), args) is not None


class StreamWriter:
    """A synchronous writer of one job's stream: `start`, tokens from 0, the end, one each.

    Every write carries this writer's token; once another writer owns the stream, or it was
    closed (a cancel, a clean-up), each write raises instead of reaching the stream. It
    renews no lease: its lease lasts `lease` seconds (by default as long as the stream), after
    which a worker may take the job over.
    """

    def __init__(
        self,
        client: Redis,
        job_id: str,
        *,
        ttl: int,
        events_cap: int = keys.EVENTS_HARD_CAP,
        lease: float | None = None,
        maxlen: int = 0,
    ) -> None:
        self.job_id = job_id
        self.writer_token = new_writer_token()
        self.events_cap = events_cap
        self.tokens = 0
        self._client = client
        self._ttl = ttl
        self._lease_ms = int(1000 * (ttl if lease is None else lease))
        self._maxlen = maxlen

    def start(self, entry: StartEntry, queue: str | None = None) -> None:
        """Write the `start` entry and the `started` event, and become the stream's writer.

        Raises WriterFencedError if the stream has another writer (the job runs twice), and
        StreamClosedError if it was ended before it started (cancelled while queued).
        """
        if entry.writer != self.writer_token:
            raise ValueError("the start entry must carry this writer's token")
        args = scripts.begin_args(
            entry,
            ttl=self._ttl,
            queue=queue,
            events_cap=self.events_cap,
            lease_ms=self._lease_ms,
            maxlen=self._maxlen,
        )
        run_script(self._client, scripts.BEGIN, scripts.with_events(self.job_id), args)

    def token(self, text: str) -> None:
        """Append one token; raises once the stream was closed or fenced elsewhere."""
        entry = TokenEntry(self.tokens, text)
        args = scripts.append_args(self.writer_token, entry, ttl=self._ttl, maxlen=self._maxlen)
        run_script(self._client, scripts.APPEND, scripts.stream_keys(self.job_id), args)
        self.tokens += 1

    def close(self, entry: Terminal, *, queue: str | None = None, model: str | None = None) -> bool:
        """Write this attempt's terminal entry; False if the stream was closed elsewhere first."""
        return close_stream(
            self._client,
            self.job_id,
            entry,
            ttl=self._ttl,
            queue=queue,
            model=model,
            writer=self.writer_token,
            events_cap=self.events_cap,
        )
