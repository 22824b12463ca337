"""The transcript recorder: one text file and one metadata file for every job that ended.

Files appear atomically (written without a name, flushed, then linked into place) and are
created once: a job that is delivered again, after a crash or to a second recorder, never
overwrites the transcript that exists. The metadata file is written last, so its presence
means the transcript is complete. A stream is read page by page and written as it is
read, so a recorder's memory does not grow with the length of a generation.

The text is the job's final text: an `attempt` entry with the `restart` policy voids what
was written before it (`stream.text.starts_over`), and the metadata says how many attempts
there were. Tokens that a capped stream lost before they were read (`gap` records) are
listed in the metadata (`trimmed`), logged (`transcript.gap`) and counted (`streams_gapped`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from redis.client import Pipeline

from tokenrelay.consumer.files import NewFile, write_once
from tokenrelay.consumer.group import Delivery
from tokenrelay.errors import ProtocolError
from tokenrelay.stream import keys
from tokenrelay.stream.keys import JOB_ID_PATTERN, Stat
from tokenrelay.stream.protocol import (
    AttemptEntry,
    EndEntry,
    ErrorEntry,
    Event,
    GapEntry,
    Record,
    StartEntry,
    Terminal,
    TokenEntry,
    ended_as,
)
from tokenrelay.stream.reader import scan_stream
from tokenrelay.stream.text import starts_over

log = structlog.get_logger()

ENDED = frozenset({Event.FINISHED, Event.FAILED, Event.CANCELLED})


class UnreadableTranscriptError(Exception):
    """A transcript's metadata file exists but cannot be read (truncated, not JSON)."""


@dataclass
class _Transcript:
    """What the recorder learns of a stream as it reads it."""

    first_id: str
    last_id: str = ""
    start: StartEntry | None = None
    end: Terminal | None = None
    attempts: int = 1
    trimmed: list[tuple[int, int]] = field(default_factory=list)
    tokens: int = 0
    text_bytes: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)

    def take(self, record: Record, text: NewFile) -> None:
        """Note one record; a token's text goes on into `text`, a restart empties it."""
        entry = record.entry
        if isinstance(entry, GapEntry):  # made by the reader: it names no entry of its own
            self.trimmed.append((entry.first_seq, entry.last_seq))
            return
        self.last_id = record.id
        if isinstance(entry, TokenEntry):
            data = entry.text.encode()
            text.write(data)
            self.sha256.update(data)
            self.text_bytes += len(data)
            self.tokens += entry.count
        elif isinstance(entry, AttemptEntry):
            self.attempts = max(self.attempts, entry.attempt)
            if starts_over(entry):
                text.truncate()
                self.sha256, self.text_bytes, self.tokens = hashlib.sha256(), 0, 0
        elif isinstance(entry, StartEntry):
            self.start = entry
        elif isinstance(entry, EndEntry | ErrorEntry):
            self.end = entry


def transcript_metadata(job_id: str, seen: _Transcript) -> dict[str, Any]:
    """What the metadata file says about a job, from what its stream held."""
    start, end = seen.start, seen.end
    assert end is not None
    meta: dict[str, Any] = {
        "job_id": job_id,
        "status": ended_as(end).value,
        "model": start.model if start else None,
        "worker": start.worker if start else None,
        "attempt": start.attempt if start else None,
        "attempts": end.attempts if isinstance(end, EndEntry) else seen.attempts,
        "prompt_chars": start.prompt_chars if start else None,
        "max_tokens": start.max_tokens if start else None,
        "tokens": seen.tokens,
        "text_bytes": seen.text_bytes,
        "text_sha256": seen.sha256.hexdigest(),
        "trimmed": [list(lost) for lost in seen.trimmed],
        "first_entry_id": seen.first_id,
        "last_entry_id": seen.last_id,
        "submitted_at": start.submitted_at if start else None,
        "started_at": start.started_at if start else None,
        "recorded_at": round(time.time(), 3),
    }
    if isinstance(end, EndEntry):
        meta["finish_reason"] = end.finish_reason
        meta["usage"] = {
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.completion_tokens,
            "total_tokens": end.total_tokens,
        }
        meta["timings_ms"] = {
            "queue_wait": end.queue_wait_ms,
            "time_to_first_token": end.ttft_ms,
            "duration": end.duration_ms,
        }
    else:
        meta["error"] = {
            "type": end.error_type,
            "message": end.message,
            "retryable": end.retryable,
        }
    return meta


def _head(stream: Iterator[Record]) -> list[Record]:
    """The stream's first entry, after any gap records before it (empty: no entries)."""
    head = []
    for record in stream:
        head.append(record)
        if not isinstance(record.entry, GapEntry):
            return head
    return []


class Recorder:
    """Writes `DIR/JOB_ID.txt` (the text) and `DIR/JOB_ID.json` (the metadata) per ended job."""

    def __init__(self, client: Redis, directory: Path) -> None:
        self.client = client
        self.directory = directory
        self.stats_key = keys.consumer_stats(keys.RECORDER_GROUP)
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, delivery: Delivery, pipe: Pipeline) -> None:
        """Record the job of an end-of-job event; other events need nothing."""
        event = delivery.event
        if event.event not in ENDED:
            return
        job_id = event.job_id
        if not JOB_ID_PATTERN.fullmatch(job_id):  # it becomes a file name
            log.warning("transcript.bad_job_id", job_id=repr(job_id))
            pipe.hincrby(self.stats_key, Stat.EVENTS_MALFORMED, 1)
            return
        stream = scan_stream(self.client, job_id)
        try:
            self._record(job_id, stream, pipe)
        except ProtocolError as exc:
            log.warning("transcript.stream_malformed", job_id=job_id, error=str(exc))
            pipe.hincrby(self.stats_key, Stat.STREAMS_MALFORMED, 1)

    def _record(self, job_id: str, stream: Iterator[Record], pipe: Pipeline) -> None:
        head = _head(stream)
        if not head:
            self._missing(job_id, pipe, entries=0)
            return
        first_id = head[-1].id
        name = self._file_name(job_id, first_id)
        if name is None:
            log.info("transcript.exists", job_id=job_id)
            return
        seen = _Transcript(first_id)
        with NewFile(self.directory) as text:
            for record in itertools.chain(head, stream):
                seen.take(record, text)
            if seen.end is None:
                self._missing(job_id, pipe, entries=seen.tokens + (seen.start is not None))
                return
            text.link(f"{name}.txt")
        meta = transcript_metadata(job_id, seen)
        data = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
        write_once(self.directory / f"{name}.json", data)
        pipe.hincrby(self.stats_key, Stat.TRANSCRIPTS, 1)
        if seen.trimmed:
            log.warning("transcript.gap", job_id=job_id, trimmed=meta["trimmed"])
            pipe.hincrby(self.stats_key, Stat.STREAMS_GAPPED, 1)
        log.info("transcript.written", job_id=job_id, status=meta["status"], tokens=meta["tokens"])

    def _missing(self, job_id: str, pipe: Pipeline, *, entries: int) -> None:
        """The stream expired (or was trimmed) before it was read: log and count it."""
        log.warning("transcript.stream_missing", job_id=job_id, entries=entries)
        pipe.hincrby(self.stats_key, Stat.STREAMS_MISSING, 1)

    def _file_name(self, job_id: str, first_entry_id: str) -> str | None:
        """The transcript's file name without suffix; None if this job is recorded already.

        A job id can be used again once the first job with it has expired; the later job's
        transcript is named after its first entry id as well.
        """
        for name in (job_id, f"{job_id}.{first_entry_id}"):
            meta = self.directory / f"{name}.json"
            if not meta.exists():
                return name
            try:
                recorded = json.loads(meta.read_bytes()).get("first_entry_id")
            except (ValueError, AttributeError) as exc:  # not JSON, not UTF-8, not an object
                raise UnreadableTranscriptError(
                    f"{meta} exists but is not a transcript's metadata ({exc}); "
                    "move it away and the job is recorded again"
                ) from None
            if recorded == first_entry_id:
                return None
        return None  # pragma: no cover (a third job under one id, at the same entry id)
