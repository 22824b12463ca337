"""Which attempt at its generation an RQ job is: the one rule, for every entry and log line."""

from __future__ import annotations

from rq.job import Job


def attempt_of(job: Job) -> int:
    """The attempt number, from 1: RQ counts the retries it has made of the job."""
    return (job.number_of_retries or 0) + 1
