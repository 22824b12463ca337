"""The concurrent worker: up to N generations at once on one event loop, for the process's life.

A slot is taken before a job: the loop waits for a free one, then takes the next job off the
queue with a blocking move (so an idle worker starts a new job at once), and runs it as a
task. Each task has its own timeout and its own way to be stopped (a stop command, a cancel
noticed at the heartbeat, a cold shutdown); the worker records why before cancelling it,
and the generation ends its stream with that reason. RQ's bookkeeping runs in a small pool
of threads; nothing on a token's way blocks the loop.

Signals: the first SIGINT or SIGTERM stops taking jobs and lets the running ones finish (warm
shutdown); a second one stops them all at once, each with a `WorkerShutdown` error (cold).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog
from rq import Queue
from rq.executions import Execution
from rq.job import JobStatus
from rq.timeouts import JobTimeoutException

from tokenrelay.connection import async_client_for
from tokenrelay.errors import StreamClosedError, WorkerShutdownError, WriterFencedError
from tokenrelay.settings import Settings
from tokenrelay.stream.batcher import StreamBatcher
from tokenrelay.stream.keys import WorkerStat
from tokenrelay.stream.protocol import CANCELLED, ErrorEntry
from tokenrelay.worker.generation import JobRun, generate
from tokenrelay.worker.intake import DEQUEUE_WAIT, Intake
from tokenrelay.worker.lag import LoopLag
from tokenrelay.worker.llm import ChatModels
from tokenrelay.worker.rq_worker import RelayJob, RelayWorker

log = structlog.get_logger()

T = TypeVar("T")
P = ParamSpec("P")

#: Threads for RQ's (blocking) bookkeeping: taking, admitting, finishing, heartbeats.
BOOKKEEPING_THREADS = 16

#: The most jobs taken off the queues in one round trip.
DEQUEUE_BATCH = 50

#: Seconds to wait before trying the queue again after Redis failed.
RETRY_DELAY = 1.0


@dataclass
class _Running:
    """A job in flight: its task, what it runs, and RQ's record of it."""

    task: asyncio.Task[None]
    run: JobRun
    execution: Execution | None = None
    reason: str | None = None  # why the worker stopped it: timeout, stopped, lost, shutdown


class WorkerLoop:
    """Runs jobs from `worker`'s queues, up to `concurrency` at once, until stopped."""

    def __init__(
        self, worker: RelayWorker, settings: Settings, *, concurrency: int, burst: bool = False
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.concurrency = concurrency
        self.burst = burst
        self.running: dict[str, _Running] = {}  # by job id
        self.lag = LoopLag(settings.loop_lag_limit)
        self._stopping = asyncio.Event()
        self._cold = False
        self._busy = 0  # jobs taken off a queue and not yet over (being admitted, or running)
        self._slot_freed = asyncio.Event()
        self._admissions: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(BOOKKEEPING_THREADS, thread_name_prefix="rq-bookkeeping")

    async def run(self) -> None:
        """Work until stopped (or, in burst mode, until the queues are empty)."""
        loop = asyncio.get_running_loop()
        self.worker.on_command = lambda payload: loop.call_soon_threadsafe(self._command, payload)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signal, signum)
        self.redis = async_client_for(self.settings)
        self.intake = Intake(self.redis, self.worker.queues, burst=self.burst)
        self.batcher = StreamBatcher(self.redis, tokens_per_entry=self.settings.tokens_per_entry)
        self.models = ChatModels(self.settings, connections=self.concurrency)
        background = [
            asyncio.create_task(self.batcher.serve(), name="stream-batcher"),
            asyncio.create_task(self.lag.watch(), name="loop-lag"),
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._maintenance(), name="maintenance"),
        ]
        try:
            await self._take_jobs()
            while self.running or self._admissions:  # warm shutdown: the jobs in flight finish
                await asyncio.wait([*self._admissions, *(r.task for r in self.running.values())])
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.models.aclose()
            await self.redis.aclose()
            self._pool.shutdown(wait=True)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def _sync(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking RQ bookkeeping in the pool, with this task's log context."""
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # Taking jobs.

    async def _take_jobs(self) -> None:
        while not self._stopping.is_set():
            if self.lag.overloaded:
                await _within(self.lag.calm(), DEQUEUE_WAIT)
                continue
            free = self.concurrency - self._busy
            if free <= 0:
                self._slot_freed.clear()
                await _within(self._slot_freed.wait(), DEQUEUE_WAIT)
                continue
            try:
                taken = await self.intake.take(min(free, DEQUEUE_BATCH), self._stopping)
            except Exception:  # Redis is down, or the queue could not be read: look again soon
                log.exception("worker.dequeue_failed")
                await _within(self._stopping.wait(), RETRY_DELAY)
                continue
            if not taken and self.burst and not self._busy:
                return
            for job_id, queue_key in taken:
                self._busy += 1
                admission = asyncio.create_task(self._admit(job_id, queue_key))
                self._admissions.add(admission)
                admission.add_done_callback(self._admissions.discard)

    async def _admit(self, job_id: str, queue_key: str) -> None:
        """Fetch a job moved off its queue and start it, beside the loop's next dequeue."""
        try:
            taken = await self._sync(self.worker.take_and_admit, job_id, queue_key)
        except Exception:
            log.exception("worker.take_failed", job_id=job_id)
            taken = None
        if taken is None:
            self._release()
        else:
            self._start(*taken)

    def _release(self) -> None:
        self._busy -= 1
        self._slot_freed.set()

    def _start(self, job: RelayJob, queue: Queue, execution: Execution) -> None:
        run = JobRun(job, self.settings, self.batcher, self.models, worker=self.worker.name)
        task = asyncio.create_task(self._execute(run, queue, execution), name=f"job-{job.id}")
        self.running[job.id] = _Running(task, run, execution)

    # Running one job.

    async def _execute(self, run: JobRun, queue: Queue, execution: Execution) -> None:
        job = run.job
        entry = self.running[job.id]
        with structlog.contextvars.bound_contextvars(job_id=job.id, attempt=run.attempt):
            try:
                await self._perform(run, queue, execution, entry)
            except Exception:
                log.exception("worker.job_bookkeeping_failed")
            finally:
                del self.running[job.id]
                self._release()

    async def _perform(
        self, run: JobRun, queue: Queue, execution: Execution, entry: _Running
    ) -> None:
        job, worker = run.job, self.worker
        assert isinstance(job, RelayJob)
        timeout = None if job.timeout == -1 else (job.timeout or Queue.DEFAULT_TIMEOUT)
        timer = None
        if timeout is not None:
            message = f"the job ran longer than its timeout ({timeout} s)"
            stop = ErrorEntry("JobTimeoutException", message, True, run.attempt)
            loop = asyncio.get_running_loop()
            timer = loop.call_later(timeout, self._stop, job.id, "timeout", stop)
        try:
            result = await generate(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._stopped(run, queue, execution, entry.reason))
            if entry.reason is None:
                raise  # not the worker's doing: the loop itself is going away
        except StreamClosedError:  # ended elsewhere: a cancel
            await asyncio.shield(self._sync(worker.finish_stopped, job, queue, execution))
        except WriterFencedError:  # the job runs in another worker too: that run is the job's
            await asyncio.shield(self._sync(worker.drop, job, execution))
        except Exception as exc:
            failure = (type(exc), exc, exc.__traceback__)
            await asyncio.shield(self._sync(worker.finish_failed, job, queue, execution, failure))
        else:
            await asyncio.shield(self._sync(worker.finish_ok, job, queue, execution, result))
        finally:
            if timer is not None:
                timer.cancel()

    async def _stopped(
        self, run: JobRun, queue: Queue, execution: Execution, reason: str | None
    ) -> None:
        """RQ's record of a job the worker stopped, by why it stopped it."""
        job, worker = run.job, self.worker
        if reason == "stopped":
            await self._sync(worker.finish_stopped, job, queue, execution)
        elif reason == "lost":
            await self._sync(worker.drop, job, execution)
        else:
            assert run.stop is not None or reason is None
            error: BaseException = (
                JobTimeoutException(run.stop.message)
                if reason == "timeout" and run.stop is not None
                else WorkerShutdownError("the worker stopped while running the job")
            )
            failure = (type(error), error, None)
            await self._sync(worker.finish_failed, job, queue, execution, failure)

    def _stop(self, job_id: str, reason: str, entry: ErrorEntry) -> None:
        """Stop one running job, the stream to end with `entry` (on the loop's thread)."""
        running = self.running.get(job_id)
        if running is None or running.task.done() or running.reason is not None:
            return
        running.reason = reason
        running.run.stop = entry
        running.task.cancel()
        log.info("job.stopping", job_id=job_id, reason=reason)

    # Commands, signals, heartbeats, maintenance.

    def _command(self, payload: dict[str, Any]) -> None:
        """A command from RQ's pubsub (stop a job, shut down), on the loop's thread."""
        command = payload.get("command")
        if command == "stop-job":
            job_id = str(payload.get("job_id"))
            running = self.running.get(job_id)
            attempt = running.run.attempt if running else 1
            stop = ErrorEntry("JobStopped", "the job was stopped on request", False, attempt)
            self._stop(job_id, "stopped", stop)
        elif command == "stop-execution":
            for job_id, running in list(self.running.items()):
                if running.execution is not None and running.execution.id == payload.get(
                    "execution_id"
                ):
                    stop = ErrorEntry("JobStopped", "the job was stopped on request", False, 1)
                    self._stop(job_id, "stopped", stop)
        elif command == "shutdown":
            self._signal(signal.SIGTERM)
        else:
            log.info("worker.command_ignored", command=command)

    def _signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self._stopping.is_set():
            self._stopping.set()
            log.info("worker.warm_shutdown", signal=name, in_flight=len(self.running))
            return
        if self._cold:
            return
        self._cold = True
        log.warning("worker.cold_shutdown", signal=name, in_flight=len(self.running))
        for job_id, running in list(self.running.items()):
            stop = ErrorEntry(
                "WorkerShutdown",
                "the worker was shut down while running the job",
                True,
                running.run.attempt,
            )
            self._stop(job_id, "shutdown", stop)

    async def _heartbeats(self) -> None:
        """Every `heartbeat_interval`: RQ's heartbeats; jobs cancelled elsewhere are stopped."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            executions = {
                r.execution.id: job_id for job_id, r in self.running.items() if r.execution
            }
            known = [r.execution for r in self.running.values() if r.execution is not None]
            try:
                gone = await self._sync(self.worker.tick, known, self._stats())
            except Exception:
                log.exception("worker.heartbeat_failed")
                continue
            for execution_id, status in gone.items():
                job_id = executions.get(execution_id)
                if job_id is not None and job_id in self.running:
                    self._lost(job_id, status)

    def _stats(self) -> dict[str, float]:
        """The worker's gauges, for its stats hash (and the metrics exporter)."""
        taking = not (self.lag.overloaded or self._stopping.is_set())
        return {
            WorkerStat.LOOP_LAG: round(self.lag.take_worst(), 4),
            WorkerStat.IN_FLIGHT: self._busy,
            WorkerStat.TAKING_JOBS: int(taking),
            WorkerStat.STREAM_WRITES: self.batcher.flushes,
            WorkerStat.TOKEN_ENTRIES: self.batcher.entries,
        }

    def _lost(self, job_id: str, status: str | None) -> None:
        """A running job's RQ status changed elsewhere: a `job.cancel()`, or a clean-up."""
        running = self.running[job_id]
        if status == JobStatus.CANCELED:
            stop = ErrorEntry(CANCELLED, "cancelled on request", False, running.run.attempt)
        else:
            stop = ErrorEntry(
                "JobLost", "the job was ended elsewhere while it ran", True, running.run.attempt
            )
        self._stop(job_id, "lost", stop)

    async def _maintenance(self) -> None:
        """Every `maintenance_interval`: end abandoned jobs, tidy RQ, trim lifecycle events."""
        while True:
            try:
                await self._sync(self.worker.clean_up)
            except Exception:
                log.exception("worker.maintenance_failed")
            await asyncio.sleep(self.settings.maintenance_interval)


async def _within(awaitable: Any, seconds: float) -> bool:
    """Await it for at most `seconds`; whether it finished."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True
