"""RQ's side of a worker that runs many jobs at once: taking, admitting, heartbeating, finishing.

`RelayWorker` is an RQ `BaseWorker` without work horses: RQ's registration, heartbeats,
registries, executions and finalisers stay RQ's own, called from the worker loop's thread
pool (they use the synchronous Redis client), while each job runs as a task on the loop.
Three things RQ's stock worker does for one job at a time are done here for many:

- commands: a stop for any of the running jobs reaches its task (RQ's own handler matches
  only the first execution);
- heartbeats: every execution's, in one pipeline, which also notices jobs that were
  cancelled or failed elsewhere (`job.cancel()` does not tell the worker);
- callbacks and clean-up run in threads, so their time limit is a thread timer, not SIGALRM.

A job whose worker died is taken over through its lease (`worker.leases`), not failed as
RQ's clean-up of abandoned jobs would: `adopt` moves RQ's record of it to this worker, and
`clean_up` leaves a leased job's lapsed executions to the takeover.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.callbacks import execute_stopped_callback
from rq.command import parse_payload
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, parse_composite_key
from rq.worker import BaseWorker, WorkerStatus

from tokenrelay.errors import RedisUnavailableError
from tokenrelay.outage import Outage, backoff, is_down
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import trim_events
from tokenrelay.stream.keys import StateField
from tokenrelay.worker.rq_job import RelayJob, ThreadTimerDeathPenalty

log = structlog.get_logger()

#: Seconds a clean-up of the started registries holds its lock.
CLEANUP_LOCK = 30

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class RelayWorker(BaseWorker):
    """RQ's bookkeeping for tokenrelay's concurrent worker; every method here blocks on Redis."""

    death_penalty_class = ThreadTimerDeathPenalty

    def __init__(
        self,
        queues: Sequence[str],
        *,
        connection: Redis,
        settings: Settings,
        outage: Outage,
        name: str | None = None,
    ) -> None:
        self._local = threading.local()  # before RQ's __init__, which sets _stopped_job_id
        super().__init__(
            # The queues' job class is what RQ's registry clean-up fetches abandoned jobs
            # with (and calls their failure callback through): it must be ours too.
            [
                Queue(q, connection=connection, serializer=JSONSerializer, job_class=RelayJob)
                for q in queues
            ],
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            job_class=RelayJob,
            log_job_description=False,
            job_monitoring_interval=settings.heartbeat_interval,
            maintenance_interval=settings.maintenance_interval,
        )
        self.relay_settings = settings
        #: The process's record of Redis being away (shared with the worker loop).
        self.outage = outage
        #: Where commands (stop a job, shut down) go: set by the worker loop.
        self.on_command: Callable[[dict[str, Any]], object] = lambda payload: None

    # RQ keeps the id of the job being stopped in one attribute per worker; with many jobs
    # finishing at once in different threads, it must be one per thread.
    @property
    def _stopped_job_id(self) -> str | None:
        return getattr(self._local, "stopped_job_id", None)

    @_stopped_job_id.setter
    def _stopped_job_id(self, value: str | None) -> None:
        self._local.stopped_job_id = value

    def handle_payload(self, message: dict[str, Any]) -> None:
        """A command from RQ's pubsub thread: hand it to the loop."""
        self.on_command(parse_payload(message))

    def request_stop_execution(self, execution_id: str) -> None:
        self.on_command({"command": "stop-execution", "execution_id": execution_id})

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        """The command listener lost Redis: note the outage (logged once), wait, listen again.
        RQ's own handler retries only ConnectionError, and logs every two seconds."""
        if not is_down(exc):
            log.warning("worker.commands_stopped", error=str(exc))
            raise exc
        with contextlib.suppress(RedisUnavailableError):  # commands wait however long it takes
            self.outage.failed(exc)
        time.sleep(backoff(3))

    def kill_horse(self, sig: int = 0) -> None:
        """There are no work horses to kill: the job tasks are stopped through `on_command`."""

    # Taking and admitting jobs.

    def take(self, job_id: str, queue_key: str) -> tuple[RelayJob, Queue] | None:
        """The job behind an id just moved off a queue, if it still waits to run."""
        taken = Queue._fetch_dequeued_job(
            self.connection, queue_key, job_id, RelayJob, self.serializer, None
        )
        if taken is None:
            return None
        fetched, queue = taken
        assert isinstance(fetched, RelayJob)
        if fetched.get_status(refresh=False) != JobStatus.QUEUED:  # cancelled meanwhile
            self.connection.lrem(queue.intermediate_queue_key, 1, fetched.id)
            return None
        try:
            fetched.check_runnable()
        except Exception:  # another callable, or a payload JSON cannot read: never run it
            log.warning("job.refused", job_id=fetched.id, exc_info=True)
            self.connection.lrem(queue.intermediate_queue_key, 1, fetched.id)
            self.handle_job_failure(fetched, queue, exc_string=traceback.format_exc())
            return None
        return fetched, queue

    def take_and_admit(
        self, job_id: str, queue_key: str
    ) -> tuple[RelayJob, Queue, Execution] | None:
        """`take`, then `admit`, in one call (one trip to the thread pool)."""
        taken = self.take(job_id, queue_key)
        if taken is None:
            return None
        job, queue = taken
        return job, queue, self.admit(job)

    def admit(self, job: Job) -> Execution:
        """Mark the job started, as RQ's worker does when its horse begins."""
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        return execution

    def adopt(self, job_id: str) -> tuple[RelayJob, Queue, Execution] | str:
        """Take over RQ's record of a running job whose worker died (its lease was claimed):
        the dead worker's executions go, this worker's begins. Otherwise, why not: RQ no
        longer has the job (`"missing"`), it is not one a tokenrelay worker runs
        (`"refused"`), or RQ says it ended (its status: `"canceled"`, `"stopped"`, ...)."""
        try:
            job = RelayJob.fetch(job_id, connection=self.connection, serializer=self.serializer)
            assert isinstance(job, RelayJob)
            job.check_runnable()
        except NoSuchJobError:
            return "missing"
        except Exception:
            log.warning("job.refused", job_id=job_id, exc_info=True)
            return "refused"
        status = job.get_status(refresh=False)
        if status not in (JobStatus.STARTED, JobStatus.FAILED):
            return str(status.value if status is not None else "missing")
        queue = Queue(
            job.origin, connection=self.connection, serializer=self.serializer, job_class=RelayJob
        )
        if status == JobStatus.FAILED:  # RQ's clean-up found it abandoned; its lease says not
            job.failed_job_registry.remove(job)
        self._forget_executions(job)
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job)
        return job, queue, execution

    def _forget_executions(self, job: Job) -> None:
        """Remove every execution of the job from RQ's registries: once their heartbeats
        lapsed, RQ's clean-up would fail the job its new worker now runs."""
        registry = job.started_job_registry
        members = list(self.connection.zscan_iter(registry.key, match=f"{job.id}:*"))
        with self.connection.pipeline() as pipe:
            for member, _ in members:
                composite = member.decode() if isinstance(member, bytes) else str(member)
                _, execution_id = parse_composite_key(composite)
                Execution(execution_id, job.id, self.connection).delete(job, pipe)
            pipe.execute()

    # Finishing jobs. Each first checks that the job is still this run's: RQ says it is
    # running, and its stream has no other writer (`writer`: this run's token, None before
    # its stream began). A job cancelled or failed elsewhere meanwhile, or taken over by
    # another worker while this one was presumed dead, is left as it is: only this run's
    # execution is removed.

    def _still_running(self, job: Job, execution: Execution, writer: str | None) -> bool:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(job.key, "status")
            pipe.hget(keys.stream_state(job.id), StateField.WRITER.value)
            status, owner = pipe.execute()
        ours = writer is None or owner is None or owner.decode() == writer
        if status is not None and status.decode() == JobStatus.STARTED and ours:
            return True
        if not ours:
            log.info("job.taken_over_elsewhere", job_id=job.id)
        self.drop(job, execution)
        return False

    def finish_ok(
        self, job: Job, queue: Queue, execution: Execution, result: Any, *, writer: str | None
    ) -> None:
        if not self._still_running(job, execution, writer):
            return
        try:
            self._finalize_success(job, queue, execution, result)
        except Exception:
            self._finalize_failure(job, queue, execution, _exc_info())

    def finish_failed(
        self, job: Job, queue: Queue, execution: Execution, exc_info: ExcInfo, *, writer: str | None
    ) -> None:
        if self._still_running(job, execution, writer):
            self._finalize_failure(job, queue, execution, exc_info)

    def finish_stopped(
        self, job: Job, queue: Queue, execution: Execution, *, writer: str | None
    ) -> None:
        """A stop command (or a cancel) ended the job: RQ's `stopped` status and callback."""
        if not self._still_running(job, execution, writer):
            return
        job.ended_at = now()
        try:
            execute_stopped_callback(job, self.death_penalty_class)
        except Exception:
            log.exception("job.stopped_callback_failed")
        self._stopped_job_id = job.id
        self.handle_job_failure(job, queue, exc_string="Job stopped by user.", execution=execution)

    def drop(self, job: Job, execution: Execution) -> None:
        """Remove the job's execution, leaving its status and registries as others set them."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            pipe.execute()

    # Heartbeats and clean-up.

    def tick(self, executions: list[Execution], stats: dict[str, float]) -> dict[str, str | None]:
        """Heartbeat the worker and its executions, and write its `stats`; the executions no
        longer `started`, with their status."""
        with self.connection.pipeline() as pipe:
            stats_key = keys.worker_stats(self.name)
            pipe.hset(stats_key, mapping=stats)  # type: ignore[arg-type]  # floats are fine
            pipe.expire(stats_key, 3 * self.job_monitoring_interval)
            self.set_state(WorkerStatus.BUSY if executions else WorkerStatus.IDLE, pipeline=pipe)
            worker_heartbeat = len(pipe)  # its first command: HSET, which is 1 if it made the hash
            self.heartbeat(self.job_monitoring_interval + 60, pipeline=pipe)
            statuses = []
            for execution in executions:
                job = execution.job
                working = (now() - execution.created_at).total_seconds()
                ttl = self.get_heartbeat_ttl(job, working)
                execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
                statuses.append(len(pipe))
                pipe.hget(job.key, "status")
            replies = pipe.execute()
        if replies[worker_heartbeat] == 1:  # the worker's hash had expired: write it again
            self.connection.hset(self.key, mapping=self.serialize())
            self.connection.expire(self.key, self.job_monitoring_interval + 60)
        gone = {}
        for execution, index in zip(executions, statuses, strict=True):
            status = replies[index].decode() if replies[index] else None
            if status != JobStatus.STARTED:
                gone[execution.id] = status
        return gone

    def clean_up(self) -> None:
        """End abandoned jobs (their executions' heartbeats lapsed), tidy RQ, trim events."""
        for queue in self.queues:
            lock = keys.cleanup_lock(queue.name)
            if not self.connection.set(lock, self.name, nx=True, ex=CLEANUP_LOCK):
                continue  # another worker is at it
            registry = StartedJobRegistry(
                queue=queue, job_class=RelayJob, death_penalty_class=ThreadTimerDeathPenalty
            )
            self._spare_leased(registry)
            registry.cleanup(exception_handlers=self._exc_handlers)
        self.clean_registries()
        trim_events(self.connection)

    def _spare_leased(self, registry: StartedJobRegistry) -> None:
        """Drop the lapsed executions of jobs that hold a lease from the registry, so that RQ's
        clean-up does not fail them: a leased job is taken over, not abandoned."""
        lapsed: list[bytes] = self.connection.zrangebyscore(registry.key, 0, current_timestamp())  # type: ignore[assignment]  # bytes replies
        if not lapsed:
            return
        with self.connection.pipeline() as pipe:
            for member in lapsed:
                pipe.zscore(keys.LEASES, registry.parse_job_id(member.decode()))
            leased = pipe.execute()
        spared = [m for m, score in zip(lapsed, leased, strict=True) if score is not None]
        if spared:
            self.connection.zrem(registry.key, *spared)
            log.info("worker.leased_jobs_spared", jobs=len(spared))

    def clean_registries(self) -> None:
        """RQ's own maintenance of its other registries."""
        super().clean_registries()  # type: ignore[no-untyped-call]  # unannotated in rq


def _exc_info() -> ExcInfo:
    import sys

    kind, value, traceback = sys.exc_info()
    assert kind is not None
    assert value is not None
    return kind, value, traceback
