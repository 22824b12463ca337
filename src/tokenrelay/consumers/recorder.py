"""The transcript recorder: one text file and one metadata file for every job that ended.

Files appear atomically (written to a temporary name, flushed, then linked into
place) and are created once: a job that is delivered again, after a crash or to a
second recorder, never overwrites the transcript that exists. The metadata file is
written last, so its presence means the transcript is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from redis.client import Pipeline

from tokenrelay import keys
from tokenrelay.consumers.group import Delivery
from tokenrelay.errors import ProtocolError
from tokenrelay.keys import Stat
from tokenrelay.protocol import (
    EndEntry,
    ErrorEntry,
    Event,
    Record,
    StartEntry,
    TokenEntry,
    records,
)
from tokenrelay.request import JOB_ID_PATTERN
from tokenrelay.writer import CANCELLED

log = structlog.get_logger()

ENDED = frozenset({Event.FINISHED, Event.FAILED, Event.CANCELLED})


def write_once(path: Path, data: bytes) -> bool:
    """Create `path` with `data`, atomically and durably, unless it exists; True if created.

    The data goes into an unnamed file (O_TMPFILE) that is linked into place when complete,
    so a reader never sees half a file, and a process killed midway leaves nothing behind.
    """
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):  # no O_TMPFILE on this system or file system
        return _write_once_named(path, data)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        _write_all(fd, data)
        # linkat(…, AT_SYMLINK_FOLLOW), which os.link uses only when given directory fds.
        # It fails if the name exists, unlike a rename.
        os.link(f"/proc/self/fd/{fd}", path.name, src_dir_fd=directory, dst_dir_fd=directory)
        os.fsync(directory)  # the new name survives a machine crash before the event is acked
    except FileExistsError:
        return False
    finally:
        os.close(fd)
        os.close(directory)
    return True


def _write_once_named(path: Path, data: bytes) -> bool:
    """write_once through a named temporary file (which a crash can leave behind)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_all(fd, data)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.close(fd)
        os.unlink(tmp)
    _sync_directory(path.parent)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _sync_directory(directory: Path) -> None:
    """Make a new name in `directory` survive a machine crash before the event is acked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _status(end: EndEntry | ErrorEntry) -> str:
    if isinstance(end, EndEntry):
        return "finished"
    return "cancelled" if end.error_type == CANCELLED else "failed"


def transcript_metadata(job_id: str, stream: list[Record], text: bytes) -> dict[str, Any]:
    """What the metadata file says about a job, from its stream."""
    start = next((r.entry for r in stream if isinstance(r.entry, StartEntry)), None)
    end = stream[-1].entry
    assert isinstance(end, EndEntry | ErrorEntry)
    meta: dict[str, Any] = {
        "job_id": job_id,
        "status": _status(end),
        "model": start.model if start else None,
        "worker": start.worker if start else None,
        "attempt": start.attempt if start else None,
        "prompt_chars": start.prompt_chars if start else None,
        "max_tokens": start.max_tokens if start else None,
        "tokens": sum(isinstance(r.entry, TokenEntry) for r in stream),
        "text_bytes": len(text),
        "text_sha256": hashlib.sha256(text).hexdigest(),
        "first_entry_id": stream[0].id,
        "last_entry_id": stream[-1].id,
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
        try:
            stream = records(self.client.xrange(keys.token_stream(job_id)))
        except ProtocolError as exc:
            log.warning("transcript.stream_malformed", job_id=job_id, error=str(exc))
            pipe.hincrby(self.stats_key, Stat.STREAMS_MALFORMED, 1)
            return
        if not stream or not isinstance(stream[-1].entry, EndEntry | ErrorEntry):
            log.warning("transcript.stream_missing", job_id=job_id, entries=len(stream))
            pipe.hincrby(self.stats_key, Stat.STREAMS_MISSING, 1)
            return
        name = self._file_name(job_id, stream[0].id)
        if name is None:
            log.info("transcript.exists", job_id=job_id)
            return
        text = "".join(r.entry.text for r in stream if isinstance(r.entry, TokenEntry)).encode()
        meta = transcript_metadata(job_id, stream, text)
        write_once(self.directory / f"{name}.txt", text)
        data = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
        write_once(self.directory / f"{name}.json", data)
        pipe.hincrby(self.stats_key, Stat.TRANSCRIPTS, 1)
        log.info("transcript.written", job_id=job_id, status=meta["status"], tokens=meta["tokens"])

    def _file_name(self, job_id: str, first_entry_id: str) -> str | None:
        """The transcript's file name without suffix; None if this job is recorded already.

        A job id can be used again once the first job with it has expired; the later job's
        transcript is named after its first entry id as well.
        """
        for name in (job_id, f"{job_id}.{first_entry_id}"):
            meta = self.directory / f"{name}.json"
            if not meta.exists():
                return name
            if json.loads(meta.read_text()).get("first_entry_id") == first_entry_id:
                return None
        return None  # pragma: no cover (a third job under one id, at the same entry id)
