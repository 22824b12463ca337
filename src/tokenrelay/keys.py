"""Every Redis key, RQ name and default that tokenrelay uses, defined once.

Keys that belong to one job carry the job id as a hash tag (`{job_id}`), for a future
Cluster layout; today the append script also writes the lifecycle stream, so tokenrelay
needs a single Redis node (see docs/protocol.md).
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "tokenrelay"

#: The global lifecycle stream: one entry per job state change.
EVENTS_STREAM = f"{PREFIX}:events"

#: Approximate length the lifecycle stream is trimmed to (`XADD MAXLEN ~`).
EVENTS_MAXLEN = 100_000

#: The dotted path of the one callable a tokenrelay worker will execute.
GENERATE_FUNC = "tokenrelay.worker.generation.generate"

#: RQ callbacks, by dotted path; the only ones a tokenrelay worker will import.
ON_FAILURE_CALLBACK = "tokenrelay.worker.hooks.on_failure"
ON_STOPPED_CALLBACK = "tokenrelay.worker.hooks.on_stopped"


def token_stream(job_id: str) -> str:
    """The key of the per-job token stream."""
    return f"{PREFIX}:{{{job_id}}}:tokens"


#: Consumer groups on the lifecycle stream, one per kind of consumer.
RECORDER_GROUP = "recorder"
METRICS_GROUP = "metrics"


def consumer_stats(group: str) -> str:
    """The hash of a consumer group's own counters (the fields of `Stat`)."""
    return f"{PREFIX}:consumer:{group}"


class Stat(StrEnum):
    """The counters of a consumer group's stats hash."""

    EVENTS_HANDLED = "events_handled"  # lifecycle events acknowledged
    EVENTS_MALFORMED = "events_malformed"  # lifecycle events that could not be parsed
    EVENTS_TRIMMED = "events_trimmed"  # lifecycle events trimmed before the group read them
    STREAMS_MISSING = "streams_missing"  # job streams expired or trimmed before they were read
    STREAMS_MALFORMED = "streams_malformed"  # job streams that broke the protocol
    TRANSCRIPTS = "transcripts"  # transcripts written (the recorder)


#: The hash holding the metrics consumer's aggregates.
METRICS_STATE = f"{PREFIX}:metrics"
