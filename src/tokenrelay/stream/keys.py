"""Every Redis key, RQ name and job-id rule that tokenrelay uses, defined once.

Keys that belong to one job carry the job id as a hash tag (`{job_id}`), for a future
Cluster layout; today the append script also writes the lifecycle stream, so tokenrelay
needs a single Redis node (see docs/protocol.md).
"""

from __future__ import annotations

import re
from enum import StrEnum

PREFIX = "tokenrelay"

#: What RQ accepts in a job id, with a length cap; also safe inside a Redis hash tag and as
#: a file name (the recorder names transcripts after it).
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")

#: The global lifecycle stream: one entry per job state change.
EVENTS_STREAM = f"{PREFIX}:events"

#: The lifecycle stream's default hard cap (`XADD MAXLEN ~`, TOKENRELAY_EVENTS_MAX_LEN);
#: normally it is trimmed far below it, to what its slowest consumer group still needs
#: (`tokenrelay.stream.events.trim_events`).
EVENTS_HARD_CAP = 1_000_000

#: Where a consumer group moves a lifecycle event that failed too often (a poison event).
DEAD_LETTER_STREAM = f"{PREFIX}:dead-letter"

#: The dead-letter stream's cap (`XADD MAXLEN ~`).
DEAD_LETTER_MAXLEN = 10_000

#: The dotted path of the one callable a tokenrelay worker will execute.
GENERATE_FUNC = "tokenrelay.worker.generation.generate"

#: RQ callbacks, by dotted path; the only ones a tokenrelay worker will import.
ON_FAILURE_CALLBACK = "tokenrelay.worker.hooks.on_failure"
ON_STOPPED_CALLBACK = "tokenrelay.worker.hooks.on_stopped"


def token_stream(job_id: str) -> str:
    """The key of the per-job token stream."""
    return f"{PREFIX}:{{{job_id}}}:tokens"


def stream_state(job_id: str) -> str:
    """The hash beside a job's stream that fences its writer (the fields of `StateField`)."""
    return f"{PREFIX}:{{{job_id}}}:state"


class StateField(StrEnum):
    """The fields of a job's stream-state hash, kept by the append scripts only."""

    WRITER = "writer"  # the token of the attempt allowed to append
    NEXT_SEQ = "next_seq"  # the `seq` the next token entry must have
    START = "start"  # the entry id of the `start` entry
    END = "end"  # the entry id of the terminal entry, once written
    CLOSED_BY = "closed_by"  # the nonce of the call that wrote the terminal entry
    STARTED_AT = "started_at"  # when the first attempt began (Unix seconds), from `start`
    ATTEMPT = "attempt"  # the number of the attempt now writing, from 1
    ATTEMPT_FROM = "attempt_from"  # the `seq` at which that attempt's tokens begin
    ATTEMPT_ENTRY = "attempt_entry"  # the number of the last attempt whose entry is written
    STATUS_NONCE = "status_nonce"  # the nonce of the last `status` entry written
    COMPLETION_TOKENS = "completion_tokens"  # tokens streamed by the attempts that ended
    MAXLEN = "maxlen"  # the stream's length cap (entries), if it has one


#: The sorted set of running jobs' leases: job id -> the lease's deadline, in milliseconds of
#: Redis's clock. A worker renews the leases of its jobs; one whose deadline has passed by
#: TOKENRELAY_TAKEOVER_AFTER belongs to a worker presumed dead, and another takes it over.
LEASES = f"{PREFIX}:leases"


#: The field of a job's RQ metadata that holds the nonce of the submit that queued it.
SUBMIT_NONCE = "tokenrelay_submit"


def idempotency(key: str) -> str:
    """The key that maps a producer's idempotency key to the job it submitted."""
    return f"{PREFIX}:idempotency:{key}"


def cleanup_lock(queue: str) -> str:
    """The lock one worker at a time holds while it cleans up a queue's started registry."""
    return f"rq:tokenrelay:cleanup:{queue}"


def worker_stats(worker: str) -> str:
    """The hash of a worker's own gauges (the fields of `WorkerStat`), renewed at each heartbeat."""
    return f"{PREFIX}:worker:{worker}"


class WorkerStat(StrEnum):
    """The fields of a worker's stats hash."""

    LOOP_LAG = "loop_lag_s"  # the worst event-loop lag since the last heartbeat, in seconds
    IN_FLIGHT = "in_flight"  # jobs taken and not yet over
    TAKING_JOBS = "taking_jobs"  # 1, or 0 while the loop lags too far or the worker stops
    STREAM_WRITES = "stream_writes"  # pipelines of token entries sent, since the worker started
    TOKEN_ENTRIES = "token_entries"  # token entries written, since the worker started


#: Consumer groups on the lifecycle stream, one per kind of consumer.
RECORDER_GROUP = "recorder"
METRICS_GROUP = "metrics"


def consumer_stats(group: str) -> str:
    """The hash of a consumer group's own counters (the fields of `Stat`)."""
    return f"{PREFIX}:consumer:{group}"


def commit_fence(group: str) -> str:
    """A key a group's members WATCH and never write: watching, redis-py reports a commit
    whose reply was lost instead of sending it again (see `consumer.group`)."""
    return f"{PREFIX}:consumer:{group}:fence"


class Stat(StrEnum):
    """The counters of a consumer group's stats hash."""

    EVENTS_HANDLED = "events_handled"  # lifecycle events acknowledged
    EVENTS_MALFORMED = "events_malformed"  # lifecycle events that could not be parsed
    EVENTS_TRIMMED = "events_trimmed"  # lifecycle events trimmed before the group read them
    EVENTS_DEAD = "events_dead"  # lifecycle events moved to the dead-letter stream
    STREAMS_MISSING = "streams_missing"  # job streams expired or trimmed before they were read
    STREAMS_MALFORMED = "streams_malformed"  # job streams that broke the protocol
    STREAMS_GAPPED = "streams_gapped"  # job streams whose length cap cut tokens before reading
    TRANSCRIPTS = "transcripts"  # transcripts written (the recorder)


#: The hash holding the metrics consumer's aggregates.
METRICS_STATE = f"{PREFIX}:metrics"

#: The set of model labels the metrics consumer has admitted (bounded; the rest are `other`).
METRICS_MODELS = f"{PREFIX}:metrics:models"
