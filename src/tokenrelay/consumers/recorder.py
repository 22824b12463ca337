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
from tokenrelay.protocol import (
    EndEntry,
    ErrorEntry,
    Event,
    Record,
    StartEntry,
    TokenEntry,
    records,
)
from tokenrelay.writer import CANCELLED

log = structlog.get_logger()

ENDED = frozenset({Event.FINISHED, Event.FAILED, Event.CANCELLED})


def write_once(path: Path, data: bytes) -> bool:
    """Create `path` with `data` atomically unless it exists; True if this call created it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)  # fails if the file exists, unlike a rename
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name survives a machine crash before the ack
    finally:
        os.close(directory)
    return True


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
        meta_path = self.directory / f"{job_id}.json"
        if meta_path.exists():
            log.info("transcript.exists", job_id=job_id)
            return
        stream = records(self.client.xrange(keys.token_stream(job_id)))
        if not stream or not isinstance(stream[-1].entry, EndEntry | ErrorEntry):
            log.warning("transcript.stream_missing", job_id=job_id, entries=len(stream))
            pipe.hincrby(self.stats_key, "streams_missing", 1)
            return
        text = "".join(r.entry.text for r in stream if isinstance(r.entry, TokenEntry)).encode()
        meta = transcript_metadata(job_id, stream, text)
        write_once(self.directory / f"{job_id}.txt", text)
        write_once(meta_path, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        pipe.hincrby(self.stats_key, "transcripts", 1)
        log.info("transcript.written", job_id=job_id, status=meta["status"], tokens=meta["tokens"])
