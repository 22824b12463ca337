"""The concurrent worker: up to N generations at once on one event loop, for the process's life.

A slot is taken before a job: the loop waits for a free one, then takes the next job off the
queue with a blocking move (so an idle worker starts a new job at once), and runs it as a
task. Each task has its own timeout and its own way to be stopped (a stop command, a cancel
noticed at the heartbeat, a cold shutdown); the worker records why before cancelling it,
and the generation ends its stream with that reason. RQ's bookkeeping runs in a small pool
of threads; nothing on a token's way blocks the loop.

Each job holds a lease that the loop renews (`worker.leases`); the loop also looks every
second for jobs whose lease lapsed (their worker died) and takes them over, even when all its
slots are busy. Redis outages are ridden out: writes wait in the batcher, RQ's bookkeeping
is retried, and the process's `Outage` logs each outage once (TOKENRELAY_REDIS_OUTAGE_LIMIT).

Signals: the first SIGINT or SIGTERM stops taking jobs and lets the running ones finish (warm
shutdown); a second one stops them all at once, each with a `WorkerShutdown` error (cold).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal
import uuid
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
from tokenrelay.errors import (
    RedisUnavailableError,
    StreamClosedError,
    WorkerShutdownError,
    WriterFencedError,
)
from tokenrelay.outage import REDIS_DOWN, UNAVAILABLE, retry
from tokenrelay.settings import Settings
from tokenrelay.stream.batcher import StreamBatcher
from tokenrelay.stream.keys import WorkerStat
from tokenrelay.stream.protocol import CANCELLED, ErrorEntry
from tokenrelay.stream.scripts import Claim
from tokenrelay.worker.generation import JobRun, generate
from tokenrelay.worker.intake import DEQUEUE_WAIT, Intake
from tokenrelay.worker.lag import LoopLag
from tokenrelay.worker.leases import SCAN_INTERVAL, Held, Leases
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

#: Jobs of dead workers a worker takes over beyond its free slots, per look.
TAKEOVER_EXTRA = 5


@dataclass
class _Running:
    """A job in flight: its task, what it runs, and RQ's record of it."""

    task: asyncio.Task[None]
    run: JobRun
    execution: Execution | None = None
    #: Why the worker stopped it: timeout, stopped (a command), lost (ended elsewhere),
    #: fenced (taken over), closed (its stream ended elsewhere), shutdown.
    reason: str | None = None


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
        self.outage = worker.outage

    async def run(self) -> None:
        """Work until stopped (or, in burst mode, until the queues are empty)."""
        loop = asyncio.get_running_loop()
        self.worker.on_command = lambda payload: loop.call_soon_threadsafe(self._command, payload)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signal, signum)
        self.redis = async_client_for(self.settings)
        self.intake = Intake(self.redis, self.worker.queues, burst=self.burst)
        self.batcher = StreamBatcher(
            self.redis,
            outage=self.outage,
            tokens_per_entry=self.settings.tokens_per_entry,
            max_pending=self.settings.max_held_tokens,
        )
        self.leases = Leases(
            self.redis,
            self.outage,
            ttl=self.settings.lease_ttl,
            takeover_after=self.settings.takeover_after,
        )
        self.models = ChatModels(self.settings, connections=self.concurrency)
        background = [
            asyncio.create_task(self.batcher.serve(), name="stream-batcher"),
            asyncio.create_task(self.lag.watch(), name="loop-lag"),
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._maintenance(), name="maintenance"),
            asyncio.create_task(self._renewals(), name="lease-renewals"),
            asyncio.create_task(self._takeovers(), name="takeovers"),
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

    async def _book(self, function: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
        """`_sync`, tried again while Redis is away (up to the outage limit): a job's end must
        reach RQ's records. Each of these re-checks the job's status, so a retry is safe."""
        call = functools.partial(function, *args, **kwargs)
        await self._sync(retry, self.outage, call)

    def _redis_down(self, exc: BaseException) -> None:
        """Note that Redis is away (logged once per outage, by the outage)."""
        with contextlib.suppress(RedisUnavailableError):  # the loop never gives up
            self.outage.failed(exc)

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
            except REDIS_DOWN as exc:  # Redis is away: look again soon
                self._redis_down(exc)
                await _within(self._stopping.wait(), RETRY_DELAY)
                continue
            except Exception:  # the queue could not be read: look again soon
                log.exception("worker.dequeue_failed")
                await _within(self._stopping.wait(), RETRY_DELAY)
                continue
            self.outage.ok()
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

    def _start(
        self, job: RelayJob, queue: Queue, execution: Execution, claim: Claim | None = None
    ) -> None:
        run = JobRun(
            job, self.settings, self.batcher, self.models, worker=self.worker.name, claim=claim
        )
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
            await asyncio.shield(self._book(worker.finish_stopped, job, queue, execution))
        except WriterFencedError:  # the job runs in another worker too: that run is the job's
            await asyncio.shield(self._book(worker.drop, job, execution))
        except RedisUnavailableError:  # past the outage limit: left to a takeover
            log.error("worker.job_left_to_takeover")
        except Exception as exc:
            failure = (type(exc), exc, exc.__traceback__)
            await asyncio.shield(self._book(worker.finish_failed, job, queue, execution, failure))
        else:
            await asyncio.shield(self._book(worker.finish_ok, job, queue, execution, result))
        finally:
            if timer is not None:
                timer.cancel()

    async def _stopped(
        self, run: JobRun, queue: Queue, execution: Execution, reason: str | None
    ) -> None:
        """RQ's record of a job the worker stopped, by why it stopped it."""
        job, worker = run.job, self.worker
        if reason in ("stopped", "closed"):
            await self._book(worker.finish_stopped, job, queue, execution)
        elif reason in ("lost", "fenced"):
            await self._book(worker.drop, job, execution)
        else:
            assert run.stop is not None or reason is None
            error: BaseException = (
                JobTimeoutException(run.stop.message)
                if reason == "timeout" and run.stop is not None
                else WorkerShutdownError("the worker stopped while running the job")
            )
            failure = (type(error), error, None)
            await self._book(worker.finish_failed, job, queue, execution, failure)

    def _stop(self, job_id: str, reason: str, entry: ErrorEntry | None) -> None:
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
            except REDIS_DOWN as exc:
                self._redis_down(exc)
                continue
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
            except REDIS_DOWN as exc:
                self._redis_down(exc)
            except Exception:
                log.exception("worker.maintenance_failed")
            await asyncio.sleep(self.settings.maintenance_interval)

    # Leases: renewing this worker's, taking over dead workers' jobs.

    async def _renewals(self) -> None:
        """Every third of the lease TTL: renew the lease of every job in flight; stop the
        jobs whose stream has another writer (taken over) or has ended."""
        while True:
            await asyncio.sleep(self.leases.renew_every)
            held = [
                Held(job_id, r.run.stream.writer_token, r.run.stream.ttl)
                for job_id, r in self.running.items()
                if r.run.stream is not None and not r.task.done()
            ]
            try:
                refused = await self.leases.renew(held)
            except UNAVAILABLE as exc:
                self._redis_down(exc)
                continue
            for job_id, error in refused.items():
                reason = "fenced" if isinstance(error, WriterFencedError) else "closed"
                log.warning("job.lease_refused", job_id=job_id, reason=str(error))
                self._stop(job_id, reason, None)

    async def _takeovers(self) -> None:
        """Every second: take over jobs whose lease lapsed (their worker died), as many as
        there are free slots and a few more, so a busy worker takes them over too."""
        quiet = self.leases.ttl + self.leases.takeover_after
        while True:
            # After an outage every lease looks lapsed until its worker renews it: wait.
            if not (
                self._stopping.is_set() or self.outage.down or self.outage.recently_recovered(quiet)
            ):
                await self._take_over_lapsed()
            await asyncio.sleep(SCAN_INTERVAL)

    async def _take_over_lapsed(self) -> None:
        room = max(self.concurrency - self._busy, 0) + TAKEOVER_EXTRA
        try:
            lapsed = await self.leases.lapsed(room)
        except UNAVAILABLE as exc:
            self._redis_down(exc)
            return
        for job_id in lapsed:
            if job_id in self.running:
                continue  # its own job, whose renewal is late: the next renewal mends it
            self._busy += 1
            takeover = asyncio.create_task(self._take_over(job_id), name=f"takeover-{job_id}")
            self._admissions.add(takeover)
            takeover.add_done_callback(self._admissions.discard)

    async def _take_over(self, job_id: str) -> None:
        """Claim a lapsed job and run its next attempt here."""
        try:
            claim = await self.leases.claim(job_id)
            adopted = None if claim is None else await self._sync(self.worker.adopt, job_id)
        except Exception:
            log.exception("worker.takeover_failed", job_id=job_id)
            self._release()
            return
        if claim is None:
            self._release()
        elif adopted is None:
            await self._end_unadoptable(job_id, claim)
            self._release()
        else:
            self._start(*adopted, claim=claim)

    async def _end_unadoptable(self, job_id: str, claim: Claim) -> None:
        """End the stream of a claimed job that RQ no longer has (or that is not ours to run)."""
        stream = self.batcher.stream(
            job_id,
            ttl=self.settings.stream_ttl,
            events_cap=self.settings.events_max_len,
            claim=claim,
        )
        entry = ErrorEntry(
            "JobLost", "the job's worker died and RQ no longer has the job", False, claim.attempt
        )
        try:
            await stream.close(entry, queue=None, model=None, nonce=uuid.uuid4().hex)
        except Exception:
            log.exception("worker.takeover_failed", job_id=job_id)


async def _within(awaitable: Any, seconds: float) -> bool:
    """Await it for at most `seconds`; whether it finished."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True
