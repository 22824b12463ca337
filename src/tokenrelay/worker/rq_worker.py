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
"""

from __future__ import annotations

import ctypes
import threading
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.callbacks import execute_stopped_callback
from rq.command import parse_payload
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from tokenrelay.errors import UnsafeJobError
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import trim_events
from tokenrelay.worker import hooks

log = structlog.get_logger()

#: Seconds a clean-up of the started registries holds its lock.
CLEANUP_LOCK = 30

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class ThreadTimerDeathPenalty(BaseDeathPenalty):
    """A time limit for a callback run in a thread: a timer raises the exception in it.

    RQ's default uses SIGALRM, which works only in the main thread; its thread-based one
    rewrites `JobTimeoutException.__init__` for the whole process. This does neither. The
    exception lands when the thread next runs Python code.
    """

    def setup_death_penalty(self) -> None:
        self._thread = threading.get_ident()
        self._timer: threading.Timer | None = None
        if self._timeout and self._timeout > 0:
            self._timer = threading.Timer(self._timeout, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        exception = ctypes.py_object(self._exception)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), exception)

    def cancel_death_penalty(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class RelayJob(Job):
    """A job that runs tokenrelay's generation or nothing: the payload names no other code.

    RQ imports a job's callbacks by the dotted names stored in the job; this class never
    imports a name, it maps the few it knows to tokenrelay's hooks.
    """

    def check_runnable(self) -> None:
        """Raise UnsafeJobError unless the job names tokenrelay's generation function."""
        if self.func_name != keys.GENERATE_FUNC:
            raise UnsafeJobError(
                f"refused job {self.id}: it names {self.func_name!r}, "
                f"and a tokenrelay worker runs only {keys.GENERATE_FUNC}"
            )

    @property
    def func(self) -> Callable[..., Any]:
        self.check_runnable()
        raise UnsafeJobError("tokenrelay jobs are run by the worker's loop, not by RQ")

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> Callable[..., Any] | None:
        if self._failure_callback_name == keys.ON_FAILURE_CALLBACK:
            return hooks.on_failure
        return None

    @property
    def stopped_callback(self) -> Callable[..., Any] | None:
        if self._stopped_callback_name == keys.ON_STOPPED_CALLBACK:
            return hooks.on_stopped
        return None


class RelayWorker(BaseWorker):
    """RQ's bookkeeping for tokenrelay's concurrent worker; every method here blocks on Redis."""

    death_penalty_class = ThreadTimerDeathPenalty

    def __init__(
        self,
        queues: Sequence[str],
        *,
        connection: Redis,
        settings: Settings,
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

    # Finishing jobs (each re-checks the status: a job cancelled or failed elsewhere meanwhile
    # is left as it is, and only its execution is removed).

    def _still_running(self, job: Job, execution: Execution) -> bool:
        if job._fetch_status() == JobStatus.STARTED:
            return True
        self.drop(job, execution)
        return False

    def finish_ok(self, job: Job, queue: Queue, execution: Execution, result: Any) -> None:
        if not self._still_running(job, execution):
            return
        try:
            self._finalize_success(job, queue, execution, result)
        except Exception:
            self.finish_failed(job, queue, execution, _exc_info())

    def finish_failed(
        self, job: Job, queue: Queue, execution: Execution, exc_info: ExcInfo
    ) -> None:
        if self._still_running(job, execution):
            self._finalize_failure(job, queue, execution, exc_info)

    def finish_stopped(self, job: Job, queue: Queue, execution: Execution) -> None:
        """A stop command (or a cancel) ended the job: RQ's `stopped` status and callback."""
        if not self._still_running(job, execution):
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
            lock = f"rq:tokenrelay:cleanup:{queue.name}"
            if not self.connection.set(lock, self.name, nx=True, ex=CLEANUP_LOCK):
                continue  # another worker is at it
            registry = StartedJobRegistry(
                queue=queue, job_class=RelayJob, death_penalty_class=ThreadTimerDeathPenalty
            )
            registry.cleanup(exception_handlers=self._exc_handlers)
        self.clean_registries()
        trim_events(self.connection)

    def clean_registries(self) -> None:
        """RQ's own maintenance of its other registries."""
        super().clean_registries()  # type: ignore[no-untyped-call]  # unannotated in rq


def _exc_info() -> ExcInfo:
    import sys

    kind, value, traceback = sys.exc_info()
    assert kind is not None
    assert value is not None
    return kind, value, traceback
