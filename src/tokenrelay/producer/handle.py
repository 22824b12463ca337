"""A handle on one submitted job: its tokens, its result, its status, and cancelling it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum

from redis import Redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from tokenrelay.connection import redis_errors
from tokenrelay.errors import JobFailedError, JobNotFoundError, StreamGapError
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.protocol import (
    CANCELLED,
    EndEntry,
    Entry,
    ErrorEntry,
    Event,
    GapEntry,
    Record,
    TokenEntry,
    ended_as,
    records,
)
from tokenrelay.stream.reader import BEGINNING, read_stream
from tokenrelay.stream.text import Transcript
from tokenrelay.stream.writer import close_stream


def _translated(stream: Iterator[Record], url: str) -> Iterator[Record]:
    with redis_errors(url):
        yield from stream


def _requested_model(job: Job) -> str | None:
    """The model a job's request named, if it can be read."""
    try:
        return str(job.args[0]["model"]) if job.args[0].get("model") else None
    except Exception:  # a payload that is not ours has no model to report
        return None


class JobState(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ENDED = {
    Event.FINISHED: JobState.FINISHED,
    Event.FAILED: JobState.FAILED,
    Event.CANCELLED: JobState.CANCELLED,
}

_FROM_RQ = {
    RQStatus.QUEUED: JobState.QUEUED,
    RQStatus.DEFERRED: JobState.QUEUED,
    RQStatus.SCHEDULED: JobState.QUEUED,
    RQStatus.CREATED: JobState.QUEUED,
    RQStatus.STARTED: JobState.STARTED,
    RQStatus.FINISHED: JobState.FINISHED,
    RQStatus.FAILED: JobState.FAILED,
    RQStatus.STOPPED: JobState.FAILED,
    RQStatus.CANCELED: JobState.CANCELLED,
}


@dataclass(frozen=True)
class Result:
    """A finished generation: its text and its `end` entry (usage and timings)."""

    job_id: str
    text: str
    end: EndEntry


def token_of(entry: Entry) -> str | None:
    """The text a token entry brings; raises for what ends a reader's tokens badly (an `error`
    entry, a gap), None for the rest. The one rule of `tokens()` and `atokens()`."""
    if isinstance(entry, TokenEntry):
        return entry.text
    if isinstance(entry, GapEntry):
        raise StreamGapError(entry.first_seq, entry.last_seq)
    if isinstance(entry, ErrorEntry):
        raise JobFailedError(entry)
    return None


class Outcome:
    """A job's entries, taken in order, to its `Result`: the one rule of `result()` and
    `aresult()`. The text is the final one (a restarted attempt voids the text before)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._transcript = Transcript()

    def take(self, entry: Entry) -> Result | None:
        """The result, once `entry` ends the job well; raises JobFailedError on `error` and
        StreamGapError where a capped stream lost tokens before they were read."""
        if isinstance(entry, GapEntry):
            raise StreamGapError(entry.first_seq, entry.last_seq)
        if isinstance(entry, ErrorEntry):
            raise JobFailedError(entry)
        if isinstance(entry, EndEntry):
            return Result(self.job_id, self._transcript.text, entry)
        self._transcript.add(entry)
        return None


class JobHandle:
    """One submitted job, identified by its id; cheap to create for any id."""

    def __init__(self, client: Redis, job_id: str, *, settings: Settings) -> None:
        self.job_id = job_id
        self.stream_key = keys.token_stream(job_id)
        self._client = client
        self._settings = settings

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def records(
        self, *, after: str = BEGINNING, live: bool = False, timeout: float | None = None
    ) -> Iterator[Record]:
        """Every entry of the job's stream after `after`, until its terminal entry.

        A `live` reader starts at the newest entry when reading begins. Raises
        JobNotFoundError at once for a job that does not exist (or has expired), and
        StreamTimeoutError once `timeout` seconds have passed, whatever Redis does. A Redis
        outage is ridden out (the read goes on after the last entry it gave) for up to
        TOKENRELAY_REDIS_OUTAGE_LIMIT seconds, then RedisUnavailableError. Besides the
        stream's own entries it gives `gap` records: tokens a capped stream lost before
        they were read.
        """
        url = self._settings.effective_redis_url
        stream = read_stream(
            self._client,
            self.job_id,
            after=after,
            live=live,
            timeout=timeout,
            alive_keys=[Job.key_for(self.job_id)],
            outage_limit=self._settings.redis_outage_limit,
        )
        return _translated(stream, url)

    def tokens(self, *, after: str = BEGINNING, timeout: float | None = None) -> Iterator[str]:
        """The generated text, token by token, as it arrives; raises JobFailedError on `error`.

        Raises StreamGapError where a capped stream lost tokens before they were read. With
        the `restart` retry policy, a new attempt generates the text again from its start,
        and this yields each attempt's tokens in turn; `records()` shows the `attempt`
        entries between them, and `text()` gives the final text alone.
        """
        for _, entry in self.records(after=after, timeout=timeout):
            token = token_of(entry)
            if token is not None:
                yield token

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the job to end; its text and `end` entry, or JobFailedError.

        The text is the final one: with the `restart` retry policy, what an attempt that
        failed had generated is void. Raises StreamGapError if tokens were lost to the
        stream's length cap before they were read.
        """
        outcome = Outcome(self.job_id)
        for _, entry in self.records(timeout=timeout):
            result = outcome.take(entry)
            if result is not None:
                return result
        raise AssertionError("read_stream ends only after a terminal entry")  # pragma: no cover

    def text(self, timeout: float | None = None) -> str:
        """Wait for the job to end and return its whole text, or raise JobFailedError."""
        return self.result(timeout).text

    def status(self) -> JobState:
        """The job's state; raises JobNotFoundError for an unknown (or expired) job.

        A job whose stream has begun and not ended is `started`, whatever RQ says: its
        worker may have died, and another takes it over (the stream then shows `status`
        and `attempt` entries).
        """
        with redis_errors(self._settings.effective_redis_url):
            last = records(self._client.xrevrange(self.stream_key, count=1))
            if last:
                entry = last[0].entry
                if isinstance(entry, EndEntry | ErrorEntry):
                    return _ENDED[ended_as(entry)]
                return JobState.STARTED
            try:
                job = Job.fetch(self.job_id, connection=self._client, serializer=JSONSerializer)
            except NoSuchJobError:
                raise JobNotFoundError(f"no job {self.job_id!r} (it may have expired)") from None
            return _FROM_RQ.get(job.get_status(), JobState.QUEUED)

    def cancel(self) -> bool:
        """End the job with a `cancelled` error entry and stop it; False if it had already ended."""
        with redis_errors(self._settings.effective_redis_url):
            try:
                job = Job.fetch(self.job_id, connection=self._client, serializer=JSONSerializer)
            except NoSuchJobError:
                job = None
            entry = ErrorEntry(CANCELLED, "cancelled on request", retryable=False)
            won = close_stream(
                self._client,
                self.job_id,
                entry,
                ttl=self._settings.stream_ttl,
                events_cap=self._settings.events_max_len,
                queue=job.origin if job else None,
                model=_requested_model(job) if job else None,
            )
            if job is None or not won:  # it had ended: leave RQ's bookkeeping alone
                return won
            status = job.get_status()
            if status == RQStatus.STARTED:
                with suppress(InvalidJobOperation):  # it ended between the two calls
                    send_stop_job_command(self._client, self.job_id, serializer=JSONSerializer)
            elif _FROM_RQ.get(status) == JobState.QUEUED:
                with suppress(InvalidJobOperation):  # cancelled by someone else meanwhile
                    job.cancel()
                # RQ keeps a cancelled job (and its prompt) forever; keep it as long as its stream.
                self._client.expire(job.key, self._settings.stream_ttl)
            return won
