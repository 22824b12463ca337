"""The operator's one screen: queues, workers, jobs in flight, recent failures, consumer lag."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from tokenrelay.stream import keys
from tokenrelay.stream.events import group_lags
from tokenrelay.stream.keys import Stat
from tokenrelay.stream.protocol import Event, StartEntry, TokenEntry, parse_event, records
from tokenrelay.terminal import printable

_RECENT_EVENTS = 2000
_RECENT_FAILURES = 10


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker and what it runs."""

    name: str
    state: str
    jobs: list[str]  # the jobs it runs now (a worker runs many at once)
    queues: list[str]
    last_heartbeat_age_s: float | None


@dataclass(frozen=True)
class InFlight:
    """A job that has started and not ended."""

    job_id: str
    queue: str
    model: str | None
    worker: str | None
    age_s: float | None
    tokens: int


@dataclass(frozen=True)
class Failure:
    """A recent job that failed."""

    job_id: str
    error_type: str | None
    age_s: float


@dataclass(frozen=True)
class ConsumerInfo:
    """A consumer group on the lifecycle stream: how far behind, and its own counters."""

    group: str
    lag: int | None
    pending: int
    counters: dict[str, int]


@dataclass(frozen=True)
class Status:
    """Everything `tokenrelay status` shows."""

    queues: dict[str, int]
    workers: list[WorkerInfo]
    in_flight: list[InFlight]
    recent_failures: list[Failure]
    consumers: list[ConsumerInfo]
    taken_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """The status as plain JSON-ready data."""
        return asdict(self)


def _in_flight(client: Redis, queue: str, now: float) -> list[InFlight]:
    registry = StartedJobRegistry(queue, connection=client, serializer=JSONSerializer)
    jobs = []
    for job_id in registry.get_job_ids(cleanup=False):
        stream = keys.token_stream(job_id)
        first = records(client.xrange(stream, count=1))
        last = records(client.xrevrange(stream, count=1))
        start = first[0].entry if first and isinstance(first[0].entry, StartEntry) else None
        newest = last[0].entry if last else None
        tokens = newest.seq + newest.count if isinstance(newest, TokenEntry) else 0
        jobs.append(
            InFlight(
                job_id=job_id,
                queue=queue,
                model=start.model if start else None,
                worker=start.worker if start else None,
                age_s=round(now - start.started_at, 1) if start else None,
                tokens=tokens,
            )
        )
    return jobs


def _failures(client: Redis, now: float) -> list[Failure]:
    failures = []
    recent: Any = client.xrevrange(keys.EVENTS_STREAM, count=_RECENT_EVENTS)
    for _, fields in recent:
        event = parse_event(fields)
        if event.event is Event.FAILED:
            failures.append(Failure(event.job_id, event.error_type, round(now - event.at, 1)))
            if len(failures) == _RECENT_FAILURES:
                break
    return failures


def _workers(client: Redis, now: float) -> list[WorkerInfo]:
    found = []
    for worker in Worker.all(connection=client, serializer=JSONSerializer):
        beat = worker.last_heartbeat
        found.append(
            WorkerInfo(
                name=worker.name,
                state=str(worker.get_state()),
                jobs=sorted(e.job_id for e in worker.get_current_executions()),
                queues=worker.queue_names(),
                last_heartbeat_age_s=round(now - beat.timestamp(), 1) if beat else None,
            )
        )
    return sorted(found, key=lambda w: w.name)


def _consumers(client: Redis) -> list[ConsumerInfo]:
    infos = []
    for lag in group_lags(client):
        raw: Any = client.hgetall(keys.consumer_stats(lag.group))
        counters = {k.decode(): int(v) for k, v in raw.items()}
        infos.append(ConsumerInfo(lag.group, lag.lag, lag.pending, counters))
    return infos


def collect_status(client: Redis, queues: Sequence[str]) -> Status:
    """Read the whole status from Redis (and nothing else: no worker is asked anything)."""
    now = time.time()
    return Status(
        queues={q: Queue(q, connection=client, serializer=JSONSerializer).count for q in queues},
        workers=_workers(client, now),
        in_flight=[job for q in queues for job in _in_flight(client, q, now)],
        recent_failures=_failures(client, now),
        consumers=_consumers(client),
    )


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return ["  " + line.rstrip() for line in lines]


def render(status: Status) -> str:
    """The status as a screen of text (names that came from outside are made printable)."""
    out = ["queues"]
    out += _table([[q, str(n)] for q, n in status.queues.items()], ["queue", "queued"])
    out.append(f"workers ({len(status.workers)})")
    out += _table(
        [[w.name, w.state, str(len(w.jobs)), f"{w.last_heartbeat_age_s}s"] for w in status.workers],
        ["name", "state", "jobs", "heartbeat"],
    )
    out.append(f"in flight ({len(status.in_flight)})")
    out += _table(
        [[j.job_id, j.model or "?", f"{j.age_s}s", str(j.tokens)] for j in status.in_flight],
        ["job", "model", "age", "tokens"],
    )
    out.append(f"recent failures ({len(status.recent_failures)})")
    out += _table(
        [[f.job_id, f.error_type or "?", f"{f.age_s}s ago"] for f in status.recent_failures],
        ["job", "error", "when"],
    )
    out.append("consumers")
    out += _table(
        [
            [
                c.group,
                "?" if c.lag is None else str(c.lag),
                str(c.pending),
                str(c.counters.get(Stat.STREAMS_MISSING, 0)),
            ]
            for c in status.consumers
        ],
        ["group", "lag", "pending", "streams missing"],
    )
    return "\n".join(out) + "\n"
