"""RQ's callbacks for the ways a job ends; each writes the `error` entry unless there is one.

RQ calls the failure callback when a job raised or timed out, and when its clean-up finds a
dead worker's job abandoned; the stopped callback after a stop command. The generation
writes its own terminal entry whenever it can, so these are a safety net: for a worker that
died, and for anything that ended a job before its generation could.
"""

from __future__ import annotations

from types import TracebackType

import structlog
from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.job import Job

from tokenrelay.errors import WriterFencedError
from tokenrelay.producer.request import stream_ttl_of
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import ErrorEntry
from tokenrelay.stream.writer import close_stream
from tokenrelay.worker.attempts import current_attempt
from tokenrelay.worker.failures import error_entry

log = structlog.get_logger()


def _stream_ttl(job: Job) -> int:
    """The payload's stream TTL if it is a sane one; a payload we cannot read gets the default."""
    args = job.args if isinstance(job.args, list | tuple) else ()
    return (stream_ttl_of(args[0]) if args else None) or Settings().stream_ttl


def end_with_error(connection: Redis, job: Job, entry: ErrorEntry) -> bool:
    """Close the job's stream with `entry` unless it is closed; True if this call closed it."""
    with structlog.contextvars.bound_contextvars(job_id=job.id, attempt=entry.attempt):
        closed = close_stream(connection, job.id, entry, ttl=_stream_ttl(job), queue=job.origin)
        if closed:
            log.warning("job.failed", error_type=entry.error_type, reason=entry.message)
        return closed


def on_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> None:
    """RQ failure callback: the job raised, timed out, or was found abandoned."""
    exc = exc_value if exc_value is not None else exc_type()
    if isinstance(exc, WriterFencedError):  # the stream is another run's: never touch it
        return
    if isinstance(exc, AbandonedJobError) and connection.zscore(keys.LEASES, job.id) is not None:
        return  # its lease says it is running, or will be taken over: not abandoned

    end_with_error(connection, job, error_entry(exc, attempt=current_attempt(connection, job.id)))


def on_stopped(job: Job, connection: Redis) -> None:
    """RQ stopped callback: a stop command killed the job's work horse."""
    attempt = current_attempt(connection, job.id)
    entry = ErrorEntry("JobStopped", "the job was stopped on request", False, attempt)
    end_with_error(connection, job, entry)
