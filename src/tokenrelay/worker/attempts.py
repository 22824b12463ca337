"""Which attempt at its generation a job is on: the one rule, for every entry and log line.

The stream's state counts attempts (`StateField.ATTEMPT`): its `start` entry makes it 1, each
retry and each takeover adds one, in the same atomic step that begins the attempt. The
worker running the job keeps its own copy (`JobRun.attempt`); anything else that writes an
entry for the job (RQ's callbacks) reads it here.
"""

from __future__ import annotations

from redis import Redis

from tokenrelay.stream import keys
from tokenrelay.stream.keys import StateField


def current_attempt(connection: Redis, job_id: str) -> int:
    """The number of the job's attempt now running (or last run), from 1."""
    raw = connection.hget(keys.stream_state(job_id), StateField.ATTEMPT.value)
    return int(raw) if raw else 1
