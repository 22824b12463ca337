"""Running workers: an RQ worker that executes only tokenrelay's generation function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any

import structlog
from redis import Redis
from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer

from tokenrelay.connection import client_for
from tokenrelay.errors import UnsafeJobError
from tokenrelay.settings import Settings
from tokenrelay.stream import keys
from tokenrelay.stream.events import trim_events
from tokenrelay.stream.protocol import ErrorEntry
from tokenrelay.worker import hooks
from tokenrelay.worker.attempts import attempt_of
from tokenrelay.worker.generation import generate, worker_settings

log = structlog.get_logger()

#: Seconds between a worker's registry clean-ups, which end a dead worker's jobs with an
#: `AbandonedJobError` entry once their heartbeat (about 90 s) has lapsed. RQ's default, ten
#: minutes, would keep the readers of such a job waiting that much longer.
MAINTENANCE_INTERVAL = 60


class RelayJob(Job):
    """A job that runs tokenrelay's generation or nothing: the payload names no other code.

    RQ imports a job's function and callbacks by the dotted names stored in the
    job; this class never imports a name, it maps the few it knows to our functions.
    """

    @property
    def func(self) -> Callable[..., Any]:
        if self.func_name != keys.GENERATE_FUNC:
            raise UnsafeJobError(
                f"refused job {self.id}: it names {self.func_name!r}, "
                f"and a tokenrelay worker runs only {keys.GENERATE_FUNC}"
            )
        return generate

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


def _job_context(job: Job) -> AbstractContextManager[None]:
    attempt = attempt_of(job)
    return structlog.contextvars.bound_contextvars(job_id=job.id, attempt=attempt)


class RelayWorker(Worker):
    """An RQ worker with JSON jobs, the `RelayJob` allow-list and tokenrelay's end-of-job hooks."""

    def __init__(
        self,
        queues: Sequence[str],
        *,
        connection: Redis,
        settings: Settings,
        name: str | None = None,
    ) -> None:
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
            work_horse_killed_handler=self._horse_killed,
            maintenance_interval=MAINTENANCE_INTERVAL,
        )
        self.relay_settings = settings

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in a work horse, with every log line about it carrying its id."""
        with _job_context(job):
            super().execute_job(job, queue)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Run the job (in the work horse) with this worker's settings."""
        token = worker_settings.set(self.relay_settings)
        try:
            with _job_context(job):
                return bool(super().perform_job(job, queue, execution))
        finally:
            worker_settings.reset(token)

    def clean_registries(self) -> None:
        """RQ's periodic maintenance, and trimming the lifecycle stream to what groups need."""
        super().clean_registries()  # type: ignore[no-untyped-call]  # unannotated in rq
        trim_events(self.connection)

    def _horse_killed(self, job: Job, retpid: int, status: int | None, rusage: Any) -> None:
        hooks.on_work_horse_killed(job, self.connection, status)

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """A second Ctrl-C or SIGTERM: RQ kills the running job; its stream gets the error."""
        job = self.get_current_job()
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            if job is not None:
                entry = ErrorEntry(
                    "WorkerShutdown",
                    "the worker was shut down while running the job",
                    True,
                    attempt_of(job),
                )
                hooks.end_with_error(self.connection, job, entry)
            raise


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str] = (),
    burst: bool = False,
    name: str | None = None,
) -> None:
    """Work on the queues until stopped (or, with `burst`, until they are empty)."""
    client = client_for(settings)
    worker = RelayWorker(
        queues or [settings.queue], connection=client, settings=settings, name=name
    )
    log.info("worker.starting", worker=worker.name, queues=worker.queue_names(), burst=burst)
    worker.work(burst=burst, logging_level=settings.log_level.upper())
    log.info("worker.stopped", worker=worker.name)
